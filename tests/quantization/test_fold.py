"""Batch-norm folding keeps the outputs and leaves standard layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress_cli.quantization.fold import fold_batchnorm
from compress_cli.testing import tiny_cnn

X = torch.randn(9, 1, 8, 8, generator=torch.Generator().manual_seed(3))


def test_fold_batchnorm_matches_and_uses_standard_layers():
    m = tiny_cnn(seed=1).eval()
    for bn in (m.bn1, m.bn2):  # non-trivial running statistics
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    folded, pairs = fold_batchnorm(m, X[:2])
    assert pairs == ["conv1+bn1", "conv2+bn2"]
    assert isinstance(folded.bn1, nn.Identity) and folded.conv1.bias is not None
    with torch.inference_mode():
        assert torch.allclose(m(X), folded(X), atol=1e-5)
    assert isinstance(m.bn1, nn.BatchNorm2d)  # the input model is untouched


def test_fold_needs_no_trace_and_skips_a_bn_whose_input_is_read_elsewhere():
    """A data-dependent ``if`` in forward (torch.fx cannot trace it) folds by module pattern; the
    BN whose conv output also feeds a residual term stays (folding it would change that term)."""
    from compress_cli.testing import branchy_cnn

    m = branchy_cnn(seed=1).eval()
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(m)
    folded, pairs = fold_batchnorm(m, X[:2])
    assert pairs == ["conv1+bn1"]
    assert isinstance(folded.bn1, nn.Identity) and isinstance(folded.bn2, nn.BatchNorm2d)
    with torch.inference_mode():
        assert torch.allclose(m(X), folded(X), atol=1e-5) and torch.allclose(m(-X), folded(-X), atol=1e-5)


def test_fold_linear_bn1d_and_shared_or_subclassed_modules():
    class BnAct(nn.BatchNorm1d):
        """A BN subclass that does more than normalize (as timm's BatchNormAct2d): never folded."""

        def forward(self, x):
            return torch.relu(super().forward(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.bn1 = nn.Linear(64, 16), nn.BatchNorm1d(16)
            self.fc2, self.bn2 = nn.Linear(16, 16), BnAct(16)
            self.fc3, self.bn3 = nn.Linear(16, 16), nn.BatchNorm1d(16)  # fc3 runs twice

        def forward(self, x):
            h = self.bn2(self.fc2(self.bn1(self.fc1(x.flatten(1)))))
            return self.bn3(self.fc3(self.fc3(h)))

    m = Net().eval()
    for bn in (m.bn1, m.bn2, m.bn3):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    folded, pairs = fold_batchnorm(m, X[:2])
    assert pairs == ["fc1+bn1"]
    with torch.inference_mode():
        assert torch.allclose(m(X), folded(X), atol=1e-5)


def test_fold_without_batchnorm_runs_nothing():
    from compress_cli.testing import tiny_mlp

    calls = []
    m = tiny_mlp()
    m.register_forward_pre_hook(lambda *a: calls.append(1))
    folded, pairs = fold_batchnorm(m)  # no example needed: there is nothing to fold
    assert pairs == [] and calls == []


def test_int8_dynamic_activation_range_follows_reduce_range():
    """torch's dynamic Linear hard-codes 7-bit activations (module version 4); with reduce_range
    off (a VNNI CPU) the same kernel runs with full 8 bits, which is closer to fp32."""
    import copy

    from compress_cli.quantization.dynamic import dynamic_quantize, set_activation_range_

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).eval()
    x = torch.randn(32, 64) * 3
    ref = model(x)
    q = dynamic_quantize(model)
    seven = set_activation_range_(copy.deepcopy(q), reduce_range=True)
    eight = set_activation_range_(q, reduce_range=False)
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    assert {m.version for m in eight.modules() if isinstance(m, DynamicLinear)} == {3}

    def err(m):
        with torch.no_grad():
            return float((m(x) - ref).pow(2).mean())

    assert err(eight) < err(seven)
