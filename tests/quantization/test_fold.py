"""Batch-norm folding keeps the outputs and leaves standard layers."""

from __future__ import annotations

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
    folded, pairs = fold_batchnorm(m)
    assert pairs == ["conv1+bn1", "conv2+bn2"]
    assert isinstance(folded.bn1, nn.Identity) and folded.conv1.bias is not None
    with torch.inference_mode():
        assert torch.allclose(m(X), folded(X), atol=1e-5)
    assert isinstance(m.bn1, nn.BatchNorm2d)  # the input model is untouched
