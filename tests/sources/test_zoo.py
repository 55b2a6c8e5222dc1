"""Built-in zoo networks and the compress_cli.testing helpers."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from compress_cli.config.recipe import Recipe
from compress_cli.errors import SourceError
from compress_cli.sources.zoo import INPUT_SHAPES, ZOO, BasicBlock, build_zoo, input_shape
from compress_cli.testing import (
    save_tiny_checkpoint,
    seeded_zoo,
    tiny_cnn,
    tiny_mlp,
    tiny_recipe_dict,
    tiny_resnet,
)

PARAMS = {
    "digits_mlp": 17_226,
    "digits_cnn": 9_978,
    "digits_resnet": 77_754,
    "lenet5": 61_706,
    "fashion_cnn": 186_410,
    "fashion_cnn_small": 47_130,
    "outlier_cnn": 38_346,
}
ALLOWED = (
    nn.Conv2d,
    nn.BatchNorm2d,
    nn.ReLU,
    nn.Linear,
    nn.Flatten,
    nn.MaxPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Dropout,
    nn.Sequential,
    BasicBlock,
)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", sorted(ZOO))
def test_forward_shape_and_parameter_count(name):
    m = build_zoo(name).eval()
    out = m(torch.randn(4, *INPUT_SHAPES[name]))
    assert out.shape == (4, 10)
    assert n_params(m) == PARAMS[name]
    assert all(isinstance(mod, ALLOWED) for mod in m.modules())


def test_outlier_cnn_has_the_same_function_as_without_its_outlier_and_a_28x28_variant():
    plain = build_zoo("outlier_cnn", outlier=1.0).eval()
    big = build_zoo("outlier_cnn", outlier=1000.0).eval()
    big.load_state_dict(plain.state_dict())
    with torch.no_grad():
        big.gain.weight[0] *= 1000.0
        big.conv2.weight[:, 0] /= 1000.0
    fresh = build_zoo("outlier_cnn", outlier=1000.0)
    assert fresh.gain.weight[0].item() == 1000.0  # what the builder itself makes
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(big(x), plain(x), atol=1e-5)
    m = build_zoo("outlier_cnn", input_size=28).eval()
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10) and n_params(m) == 105_930
    with pytest.raises(SourceError, match="model.kwargs.input_size must be 8 or 28"):
        build_zoo("outlier_cnn", input_size=32)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_num_classes_and_in_channels(name):
    m = build_zoo(name, num_classes=3, in_channels=3).eval()
    shape = input_shape(name, in_channels=3)
    assert shape[0] == 3
    assert m(torch.randn(2, *shape)).shape == (2, 3)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_module_runs_once_per_forward(name):
    """No module instance is reused (quantization/export need one ReLU per use)."""
    m = build_zoo(name).eval()
    calls: Counter[str] = Counter()
    for mod_name, mod in m.named_modules():
        if not list(mod.children()):
            mod.register_forward_hook(lambda *_a, n=mod_name: calls.update([n]))
    m(torch.randn(2, *INPUT_SHAPES[name]))
    leaves = [n for n, mod in m.named_modules() if not list(mod.children())]
    assert calls == Counter(leaves)


def test_fashion_sizes():
    big, small = n_params(build_zoo("fashion_cnn")), n_params(build_zoo("fashion_cnn_small"))
    assert 150_000 <= big <= 260_000
    assert 0.2 <= small / big <= 0.3


def test_lenet5_32x32_and_bad_size():
    m = build_zoo("lenet5", input_size=32).eval()
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert n_params(m) == PARAMS["lenet5"]
    assert input_shape("lenet5", input_size=32) == (1, 32, 32)
    with pytest.raises(SourceError, match="input_size must be 28 or 32"):
        build_zoo("lenet5", input_size=30)


def test_digits_resnet_has_residual_blocks_with_downsample():
    m = build_zoo("digits_resnet")
    blocks = [mod for mod in m.modules() if isinstance(mod, BasicBlock)]
    assert len(blocks) == 3
    assert blocks[0].downsample is None
    assert all(isinstance(b.downsample, nn.Sequential) for b in blocks[1:])
    assert isinstance(m.get_submodule("layer2.0.downsample.conv"), nn.Conv2d)


def test_modules_addressable_by_name():
    m = build_zoo("digits_mlp")
    assert isinstance(m.fc1, nn.Linear) and m.fc3.out_features == 10
    m.fc2 = nn.Linear(128, 64)  # swap by name
    assert isinstance(build_zoo("fashion_cnn").get_submodule("conv2"), nn.Conv2d)


def test_unknown_name_and_bad_kwargs():
    with pytest.raises(
        SourceError, match=r"zoo:digit_mlp: unknown zoo model \(did you mean 'digits_mlp'\?\)"
    ):
        build_zoo("digit_mlp")
    with pytest.raises(
        SourceError, match=r"zoo:digits_mlp: bad model.kwargs \['depth'\].*allowed: num_classes, in_channels"
    ):
        build_zoo("digits_mlp", depth=3)
    with pytest.raises(SourceError, match="unknown zoo model"):
        input_shape("nope")


# --------------------------------------------------------------------------- compress_cli.testing
def test_tiny_models_are_seeded_and_leave_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = tiny_mlp(0), tiny_mlp(0), tiny_mlp(1)
    assert torch.equal(torch.rand(1), before)
    assert all(
        torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert not torch.equal(a.fc1.weight, c.fc1.weight)
    assert tiny_cnn()(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert tiny_resnet().eval()(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_save_tiny_checkpoint(tmp_path):
    p = save_tiny_checkpoint(tmp_path / "ckpt", name="digits_cnn", seed=2)
    assert p == tmp_path / "ckpt" / "model.pt"
    sd = torch.load(p, weights_only=True)
    m = build_zoo("digits_cnn")
    m.load_state_dict(sd)
    assert torch.equal(m.conv1.weight, seeded_zoo("digits_cnn", 2).conv1.weight)


def test_tiny_recipe_dict_is_valid_and_merges_overrides(tmp_path):
    d = tiny_recipe_dict(tmp_path, stages=[{"type": "evaluate"}])
    assert d["output"] == str(tmp_path / "out") and d["stages"] == [{"type": "evaluate"}]
    top = {k: v for k, v in d.items() if k != "stages"}
    r = Recipe.model_validate(top)
    assert r.device == "cpu" and r.model.source == "zoo:digits_mlp" and r.measure.latency.iterations == 3
    d = tiny_recipe_dict(tmp_path, data={"limit_train": 100}, measure={"latency": None}, name="other")
    assert d["data"] == {"source": "digits", "limit_train": 100}
    assert d["measure"]["latency"] is None and d["name"] == "other" and d["stages"] == []
    assert Recipe.model_validate(d).measure.latency is None
