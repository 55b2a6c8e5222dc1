"""The PT2E flow: a QAT graph's observers are the ones load() pins on a PTQ graph."""

from __future__ import annotations

import torch
from torch import nn

from compress_cli.quantization.pt2e import build_pt2e, prepare_qat
from compress_cli.quantization.qparams import record_qparams


def test_qat_graph_observers_match_the_ptq_graph_with_dropout():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5), nn.Linear(144, 10)
    ).eval()
    x = torch.randn(2, 1, 8, 8)
    qat = prepare_qat(model, x, reduce_range=False)
    qat.train()
    qat(torch.randn(4, 1, 8, 8))
    qat.eval()  # renames the dropout nodes
    qparams = record_qparams(qat)
    assert any("dropout" in k for k in qparams)
    graph = build_pt2e(model, qparams, False, [], [1, 8, 8])  # raises if the observers differ
    assert torch.isfinite(graph(x)).all()


def test_activations_smaller_than_2_to_the_minus_12_keep_their_levels():
    # torchao's x86 default floors every scale at 2**-12: activations spanning ~1e-4 (efficientnet_b0
    # at random init) rounded to zero and the int8 logits were all zero (SQNR 0 dB)
    from compress_cli.quantization.pt2e import pt2e_calibrate, snap_pt2e_weights_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10)).eval()
    with torch.no_grad():
        model[0].weight.mul_(1e-4)
        model[0].bias.zero_()
        model[3].bias.zero_()  # the logits are the activations' signal only
    x = torch.randn(4, 1, 8, 8)
    qparams = pt2e_calibrate(model, [x], reduce_range=False)
    snap_pt2e_weights_(model, qparams)
    graph = build_pt2e(model, qparams, False, [], [1, 8, 8])
    with torch.no_grad():
        y, y0 = graph(x), model(x)
    sqnr = 10 * torch.log10(y0.pow(2).mean() / (y - y0).pow(2).mean())
    assert sqnr > 15, f"SQNR {sqnr:.1f} dB"


class ZeroStart(nn.Module):
    """timm's MobileOne block sums its branches starting from the number 0 (``out = 0;
    out += conv(x)``; ``out += identity_out`` with ``identity_out = 0``)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        out = 0
        out += self.conv(x)
        identity = 0
        out += identity
        return self.fc(out.relu().flatten(1))


def test_a_convolution_added_to_the_number_zero_converts_and_rebuilds_the_same():
    """torchao's X86InductorQuantizer asserts (no message) on conv + a Python number: the graph is
    prepared again with its ``x + 0`` removed, at calibration and at load() alike."""
    from compress_cli.quantization.pt2e import elide_zero_adds, export_graph, pt2e_calibrate

    model = ZeroStart().eval()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    gm = export_graph(model, x[:2])
    assert elide_zero_adds(gm) == 2
    assert torch.equal(gm(x), model(x))  # removing x + 0 is exact
    qparams = pt2e_calibrate(model, [x[:2], x[2:]], False)
    graph = build_pt2e(model, qparams, False, [], [1, 8, 8])  # the same observers, pinned
    with torch.no_grad():
        y, ref = graph(x), model(x)
    assert 10 * torch.log10(ref.pow(2).mean() / (y - ref).pow(2).mean()) > 25
