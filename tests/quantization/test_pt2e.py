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
