"""The manifest describes any standard module by one generic rule (issue 15, item 3): every
``torch.nn`` layer, timm's and transformers' plain layers and the model source's own classes are
recorded by their constructor arguments (read back from the same-named attributes, checked by
rebuilding), containers by their children; anything else is refused at save time with a located
error naming the module and the recipe-level way out. A manifest names classes of the standard
packages, or of its model source's package only when that source is trusted."""

from __future__ import annotations

import inspect
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import compress_cli
from compress_cli.checkpoint import apply_architecture_diff, architecture_diff, save_model
from compress_cli.checkpoint.architecture import (
    architecture_problems,
    build_module,
    describe,
    describe_problem,
)
from compress_cli.errors import SourceError
from compress_cli.sources.models import build_from_source

# representative values for constructor arguments without a default, by name
ARGS: dict[str, object] = {
    "in_channels": 4,
    "out_channels": 6,
    "kernel_size": 3,
    "in_features": 5,
    "out_features": 7,
    "num_features": 6,
    "normalized_shape": [6],
    "num_groups": 2,
    "num_channels": 6,
    "num_embeddings": 10,
    "embedding_dim": 4,
    "embed_dim": 8,
    "num_heads": 2,
    "input_size": 5,
    "hidden_size": 6,
    "d_model": 8,
    "nhead": 2,
    "output_size": 3,
    "in1_features": 3,
    "in2_features": 4,
    "padding": 1,
    "upscale_factor": 2,
    "downscale_factor": 2,
    "groups": 2,
    "dim": 1,
    "size": 4,
    "unflattened_size": (2, 3),
    "norm_type": 2.0,
    "lambd": 0.5,
    "threshold": 0.1,
    "value": 0.0,
    "n_classes": 10,
    "cutoffs": [4],
    "num_classes": 10,
    "output_ratio": 0.5,
    "min_val": -1.0,
    "max_val": 1.0,
    "alpha": 1.0,
    "beta": 1.0,
}
# classes whose constructor needs what ARGS cannot give
SPECIAL: dict[str, dict[str, object]] = {
    "DataParallel": {"module": nn.Linear(2, 2)},
    "TransformerEncoder": {"encoder_layer": nn.TransformerEncoderLayer(8, 2), "num_layers": 1},
    "TransformerDecoder": {"decoder_layer": nn.TransformerDecoderLayer(8, 2), "num_layers": 1},
    "RNNBase": {"mode": "LSTM", "input_size": 5, "hidden_size": 6},
    "RNNCellBase": {"input_size": 5, "hidden_size": 6, "bias": True, "num_chunks": 4},
    "FractionalMaxPool2d": {"kernel_size": 2, "output_ratio": 0.5},
    "FractionalMaxPool3d": {"kernel_size": 2, "output_ratio": 0.5},
    "Transformer": {"d_model": 8, "nhead": 2, "num_encoder_layers": 1, "num_decoder_layers": 1},
}
# standard classes the generic rule cannot describe, and why (each refused, none mis-described)
NOT_DESCRIBABLE = {
    "AdaptiveLogSoftmaxWithLoss": "cannot be rebuilt",  # keeps cutoffs + [n_classes]
    "DataParallel": "'module' is a Linear",
    "TransformerEncoder": "'encoder_layer' is not kept",
    "TransformerDecoder": "'decoder_layer' is not kept",
    "TransformerEncoderLayer": "'d_model' is not kept",
    "TransformerDecoderLayer": "'d_model' is not kept",
    "Transformer": "is not the same module",  # layer counts are not attributes: the check sees it
    "LinearCrossEntropyLoss": "'in_features' is not kept",
    "RNNCellBase": "'num_chunks' is not kept",
    "TripletMarginWithDistanceLoss": "'distance_function' is a PairwiseDistance",
    **{n: "lazy module" for n in dir(nn) if n.startswith("Lazy")},
}
MODULE_CLASSES = sorted(
    n for n in dir(nn) if isinstance(getattr(nn, n), type) and issubclass(getattr(nn, n), nn.Module)
)


def construct(name: str) -> nn.Module:
    """``nn.<name>`` built with representative arguments."""
    cls = getattr(nn, name)
    if name in SPECIAL:
        return cls(**SPECIAL[name])
    kwargs = {}
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is not p.empty:
            continue
        kwargs[p.name] = ARGS[p.name]
    if name in ("RNN", "LSTM", "GRU"):
        kwargs = {"input_size": 5, "hidden_size": 6, "num_layers": 2, "bias": False, "bidirectional": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(**kwargs)


def architecture(m: nn.Module) -> tuple[str, dict[str, tuple[int, ...]]]:
    return repr(m), {k: tuple(v.shape) for k, v in m.state_dict().items()}


@pytest.mark.parametrize("name", MODULE_CLASSES)
def test_every_torch_nn_module_round_trips_or_is_refused_with_the_reason(name):
    m = construct(name)
    spec, why = describe(m)
    if name in NOT_DESCRIBABLE:
        assert spec is None and NOT_DESCRIBABLE[name] in why
        return
    assert spec is not None, why
    again = build_module(json.loads(json.dumps(spec)))  # as a manifest stores it
    assert type(again) is type(m)
    assert architecture(again) == architecture(m)


VARIANTS = {
    "mha without biases, with kv bias": lambda: nn.MultiheadAttention(
        8, 2, bias=False, add_bias_kv=True, kdim=4, vdim=6, batch_first=True
    ),
    "conv same padding, reflect": lambda: nn.Conv2d(
        3, 4, 3, padding="same", bias=False, padding_mode="reflect"
    ),
    "grouped transposed conv": lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, output_padding=1, groups=2),
    "layer norm without affine": lambda: nn.LayerNorm([6, 2], elementwise_affine=False),
    "embedding with padding index": lambda: nn.Embedding(10, 4, padding_idx=0, max_norm=1.0),
    "batch norm without momentum": lambda: nn.BatchNorm2d(4, momentum=None, affine=False),
    "upsample": lambda: nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
    "pool with ceil mode": lambda: nn.AvgPool2d(
        3, stride=2, padding=1, ceil_mode=True, count_include_pad=False
    ),
    "gru, one layer": lambda: nn.GRU(5, 6, batch_first=True),
    "lstm with projections": lambda: nn.LSTM(5, 6, proj_size=3),
    "nested containers": lambda: nn.Sequential(
        nn.AvgPool2d(2), nn.ModuleList([nn.ReLU(), nn.Conv2d(2, 2, 1)]), nn.ModuleDict({"a": nn.Identity()})
    ),
}


@pytest.mark.parametrize("case", list(VARIANTS))
def test_non_default_arguments_are_kept(case):
    m = VARIANTS[case]()
    spec, why = describe(m)
    assert spec is not None, why
    assert architecture(build_module(json.loads(json.dumps(spec)))) == architecture(m)


def test_timm_and_transformers_plain_layers_are_described_by_module_and_name():
    timm_layers = pytest.importorskip("timm.layers")
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    from transformers.activations import GELUActivation

    for m in (
        timm_layers.AvgPool2dSame(3, stride=2),
        timm_layers.Conv2dSame(4, 6, 3, stride=2),
        timm_layers.BlurPool2d(8),
        timm_layers.BatchNormAct2d(8, eps=1e-3),
        timm_layers.EcaModule(8),
        pytorch_utils.Conv1D(6, 4),
        GELUActivation(),
    ):
        spec, why = describe(m)
        assert spec is not None, f"{type(m).__name__}: {why}"
        assert spec["class"] == f"{type(m).__module__}:{type(m).__qualname__}"
        assert architecture(build_module(json.loads(json.dumps(spec)))) == architecture(m)
    # ConvNormAct does not keep its kernel_size: rebuilt from what it keeps, it would be a 1x1 conv
    spec, why = describe(timm_layers.ConvNormAct(4, 8, 3))
    assert spec is None and why == "rebuilt from its constructor arguments it is not the same module"


# --------------------------------------------------------------------------- timm ResNet-D
def test_drop_layers_on_a_timm_resnet_d_reloads_its_avgpool_shortcut(tmp_path):
    """The case issue 15 hit: a ResNet-D block replaced by its downsample path, which holds an
    AvgPool2d, crashed at save time; now it is saved and reloads with identical outputs."""
    pytest.importorskip("timm")
    from compress_cli.pruning import drop_layers

    spec = {
        "source": "timm:create_model",
        "kwargs": {"model_name": "resnet10t", "pretrained": False, "num_classes": 10},
    }
    model = build_from_source(spec).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    calib = [(x, torch.tensor([0, 1, 2, 3]))]
    protect = ["layer1*", "layer2*", "layer3*"]
    _, chosen, _ = drop_layers(model, x[:1], calib, criterion="loss", count=1, protect=protect)
    assert [c.name for c in chosen] == ["layer4.0"]
    assert isinstance(model.layer4[0][0], nn.AvgPool2d)
    d = tmp_path / "m"
    save_model(model, d, base=build_from_source(spec), model_spec=spec, input_shape=[3, 32, 32])
    (entry,) = json.loads((d / "manifest.json").read_text())["architecture"]
    assert entry["path"] == "layer4.0" and entry["children"][0]["class"] == "AvgPool2d"
    again = compress_cli.load(d)  # timm: is a built-in source kind (timm:create_model its old spelling)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_a_timm_source_manifest_may_name_timm_models_classes_and_no_other_source_may():
    """Blocks of timm's model packages (``timm.models.efficientnet:...``) are what building a
    ``timm:NAME`` source imports already; a manifest of another source may not name them."""
    entry = [{"path": "blocks.0", "class": "timm.models._efficientnet_blocks:SqueezeExcite", "args": {}}]
    assert architecture_problems(entry, "timm:efficientnet_b0") == []
    assert architecture_problems(entry, "torchvision:resnet18")
    assert architecture_problems(entry, "zoo:tiny_cnn")
    outside = [{"path": "a", "class": "timm.data.loader:Foo", "args": {}}]
    assert architecture_problems(outside, "timm:efficientnet_b0")


# --------------------------------------------------------------------------- the model's own package
@pytest.fixture
def own_package(tmp_path, monkeypatch):
    """A package ``h3_models`` on sys.path: ``h3_models.net:build`` makes a small CNN, and
    ``h3_models.layers`` defines ``Scale`` (a plain layer keeping its constructor arguments) and
    ``Opaque`` (one that does not)."""
    pkg = tmp_path / "pkgs" / "h3_models"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "layers.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Scale(nn.Module):\n"
        "    def __init__(self, channels, factor=2.0):\n"
        "        super().__init__()\n"
        "        self.channels, self.factor = channels, factor\n"
        "        self.weight = nn.Parameter(torch.ones(channels))\n"
        "    def forward(self, x):\n"
        "        return x * self.weight.view(1, -1, 1, 1) * self.factor\n\n"
        "class Opaque(nn.Module):\n"
        "    def __init__(self, channels):\n"
        "        super().__init__()\n"
        "        self.weight = nn.Parameter(torch.ones(channels))\n"
        "    def forward(self, x):\n"
        "        return x * self.weight.view(1, -1, 1, 1)\n"
    )
    (pkg / "net.py").write_text(
        "from torch import nn\n\n"
        "def build():\n"
        "    head = [nn.Flatten(), nn.Linear(64, 3)]\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1), *head)\n"
    )
    monkeypatch.syspath_prepend(str(pkg.parent))
    for name in ("h3_models", "h3_models.layers", "h3_models.net"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return pkg


def _own_model(spec):
    return build_from_source(spec).eval()


def test_classes_of_the_model_source_package_reload_only_when_trusted(tmp_path, own_package):
    from h3_models.layers import Scale

    spec = {"source": "h3_models.net:build", "kwargs": {}}
    model = _own_model(spec)
    model[2] = nn.Sequential(Scale(4, factor=0.5), nn.Conv2d(4, 4, 1))
    d = tmp_path / "m"
    save_model(model, d, base=_own_model(spec), model_spec=spec, input_shape=[3, 6, 6])
    arch = json.loads((d / "manifest.json").read_text())["architecture"]
    assert {"name": "0", "class": "h3_models.layers:Scale", "args": {"channels": 4, "factor": 0.5}} in [
        c for e in arch for c in e.get("children", [])
    ]
    with pytest.raises(SourceError, match="is code"):
        compress_cli.load(d)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(model(x), compress_cli.load(d, trust_source=True)(x))


def test_a_manifest_naming_a_package_other_than_its_source_is_refused_before_importing(tmp_path, own_package):
    spec = {"source": "zoo:digits_cnn", "kwargs": {}}
    model = build_from_source(spec).eval()
    d = tmp_path / "m"
    save_model(model, d, base=build_from_source(spec), model_spec=spec, input_shape=[1, 8, 8])
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["architecture"] = [
        {"path": "features", "class": "h3_models.layers:Scale", "args": {"channels": 4}}
    ]
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SourceError, match=r"'h3_models\.layers:Scale' is from package 'h3_models'"):
        compress_cli.load(d, trust_source=True)
    assert "h3_models.layers" not in sys.modules


def test_an_undescribable_custom_module_is_a_located_error_with_the_recipe_way_out(own_package):
    from h3_models.layers import Opaque, Scale

    for source, module, why in (
        ("zoo:digits_cnn", Scale(4), "its class is from package 'h3_models'"),
        ("h3_models.net:build", Opaque(4), "its constructor argument 'channels' is not kept as an attribute"),
    ):
        problem = describe_problem(nn.Sequential(nn.ReLU(), module), "layer4.0", source)
        assert problem is not None
        assert problem.startswith(
            f"module 'layer4.0.1' (h3_models.layers:{type(module).__name__}), inside the new Sequential "
            "'layer4.0', cannot be described in the manifest: "
        )
        assert why in problem and "protect" in problem and "ignore" in problem
        assert ("model.source of that package" in problem) == source.startswith("zoo")


def test_a_changed_module_of_unchanged_class_is_rebuilt_or_patched():
    """Same class, new constructor arguments: rebuilt from them (a pruned MultiheadAttention, a
    narrower LayerNorm); a custom class whose arguments cannot be read back is patched."""
    base = nn.Sequential(nn.MultiheadAttention(8, 2), nn.LayerNorm(8), nn.AvgPool2d(2))
    model = nn.Sequential(nn.MultiheadAttention(6, 2), nn.LayerNorm(6), nn.AvgPool2d(3))
    diff = json.loads(json.dumps(architecture_diff(base, model)))
    assert [(e["path"], e["class"]) for e in diff] == [
        ("0", "MultiheadAttention"),
        ("1", "LayerNorm"),
        ("2", "AvgPool2d"),
    ]
    again = apply_architecture_diff(
        nn.Sequential(nn.MultiheadAttention(8, 2), nn.LayerNorm(8), nn.AvgPool2d(2)), diff
    )
    assert architecture(again) == architecture(model)


def test_save_refuses_a_new_undescribable_module_naming_it(tmp_path, own_package):
    from h3_models.layers import Opaque

    spec = {"source": "zoo:digits_cnn", "kwargs": {}}
    model = build_from_source(spec).eval()
    name = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, Opaque(4))
    with pytest.raises(SourceError) as e:
        save_model(
            model, tmp_path / "m", base=build_from_source(spec), model_spec=spec, input_shape=[1, 8, 8]
        )
    (line,) = e.value.problems
    assert line.startswith(f"module {name!r} (h3_models.layers:Opaque) differs from the model source")
    assert not Path(tmp_path / "m" / "manifest.json").exists()
