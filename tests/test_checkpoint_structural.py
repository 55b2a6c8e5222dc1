"""The architecture diff's general rules used by structural stages: new plain Sequentials, in-place
patches of modules without constructor spec, parameterless layers."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from compress_cli import load
from compress_cli.checkpoint import apply_architecture_diff, architecture_diff, save_model
from compress_cli.errors import SourceError


class Block(nn.Module):
    """Stores its width (as torchvision blocks do) and owns a parameter directly."""

    def __init__(self, width: int = 6):
        super().__init__()
        self.width = width
        self.scale = nn.Parameter(torch.ones(width))
        self.conv = nn.Conv2d(width, width, 1)

    def forward(self, x):
        return self.conv(x) * self.scale.view(1, self.width, 1, 1)


def build(width: int = 6) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 1), Block(width))


def _roundtrip(base_fn, model):
    diff = json.loads(json.dumps(architecture_diff(base_fn(), model)))
    again = apply_architecture_diff(base_fn(), diff)
    again.load_state_dict(model.state_dict())
    return diff, again


def test_changed_attributes_and_own_tensors_are_patched():
    model = build()
    blk = model[1]
    blk.width = 4
    blk.scale = nn.Parameter(torch.rand(4))
    blk.conv = nn.Conv2d(4, 4, 1)
    model[0] = nn.Conv2d(3, 4, 1)
    diff, again = _roundtrip(build, model)
    kinds = {d["path"]: d["class"] for d in diff}
    assert kinds == {"0": "Conv2d", "1": "__patch__", "1.conv": "Conv2d"}
    patch = next(d for d in diff if d["class"] == "__patch__")
    assert patch["args"] == {"attrs": {"width": 4}, "tensors": {"scale": [4]}}
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    assert again[1].width == 4


def test_a_new_sequential_is_described_by_its_children(tmp_path):
    from compress_cli.sources.models import build_from_source

    spec = {"source": "zoo:digits_resnet", "kwargs": {}}
    model = build_from_source(spec).eval()
    blk = model.layer2[0]
    model.layer2[0] = nn.Sequential(blk.downsample.conv, blk.downsample.bn, nn.ReLU(), nn.Dropout(0.1))
    model.eval()
    save_model(model, tmp_path / "m", base=build_from_source(spec), model_spec=spec, input_shape=[1, 8, 8])
    again = load(tmp_path / "m")
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    assert [type(m).__name__ for m in again.layer2[0]] == ["Conv2d", "BatchNorm2d", "ReLU", "Dropout"]
    assert again.layer2[0][3].p == 0.1


def test_an_undescribable_module_in_a_new_sequential_is_refused():
    model = build()
    model[1] = nn.Sequential(Block(6))
    with pytest.raises(SourceError, match="register_module_spec"):
        architecture_diff(build(), model)
