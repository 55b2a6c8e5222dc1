from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import compress_cli
from compress_cli import load
from compress_cli.checkpoint import (
    apply_architecture_diff,
    architecture_diff,
    read_manifest,
    save_model,
)
from compress_cli.config.yaml import parse_yaml
from compress_cli.engine.run import run_recipe
from compress_cli.errors import RecipeError, StageError
from compress_cli.pruning.layers import drop_layers, find_candidates, residual_structure, score_candidates
from compress_cli.sources.models import build_from_source
from compress_cli.stages.registry import get_stage, validate
from compress_cli.testing import digits_bundle, seeded_zoo, tiny_recipe_dict, tiny_state

X1 = torch.randn(1, 1, 8, 8)
SPEC = {"source": "zoo:digits_resnet", "kwargs": {}}


@pytest.fixture(scope="module")
def calib():
    return digits_bundle(limit_train=256).calibration()[:2]


def test_candidates_of_digits_resnet():
    cands = find_candidates(seeded_zoo("digits_resnet").eval(), X1)
    got = {c.name: (c.kind, c.replacement) for c in cands}
    assert got == {
        "layer1.0": ("residual", "identity"),
        "layer2.0": ("residual", "shortcut:downsample"),
        "layer3.0": ("residual", "shortcut:downsample"),
    }
    assert all(len(c.post) == 1 and isinstance(c.post[0], nn.ReLU) for c in cands)  # relu(out + identity)
    assert residual_structure(nn.Sequential(nn.Linear(4, 4), nn.ReLU())) is None


@pytest.mark.parametrize("criterion", ["activation", "loss", "similarity"])
def test_each_criterion_drops_a_block_that_reloads(criterion, calib, tmp_path):
    model = seeded_zoo("digits_resnet").eval()
    cands, chosen, _ = drop_layers(model, X1, calib, criterion=criterion, count=2)
    assert len(chosen) == 2 and all(c.score is not None for c in cands)
    scores = sorted(c.score for c in cands)
    picked = sorted(c.score for c in chosen)
    assert picked == (scores[-2:] if criterion == "similarity" else scores[:2])
    save_model(
        model,
        tmp_path / "m",
        base=build_from_source(SPEC),
        model_spec=SPEC,
        input_shape=[1, 8, 8],
        num_classes=10,
    )
    again = load(tmp_path / "m")
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        y = model(x)
        assert y.shape == (4, 10) and torch.isfinite(y).all()
        assert torch.equal(y, again(x))
    paths = {a["path"]: a["class"] for a in read_manifest(tmp_path / "m")["architecture"]}
    assert set(paths) == {c.name for c in chosen}


def test_replacements_identity_and_shortcut_with_relu(calib):
    model = seeded_zoo("digits_resnet").eval()
    with torch.no_grad():
        x = calib[0][0]
        h = model.relu(model.bn1(model.conv1(x)))
        expected = F.relu(model.layer2[0].downsample(h))
    cands = find_candidates(model, X1)
    by = {c.name: c for c in cands}
    for c in cands:
        c.score = 0.0 if c.name in ("layer1.0", "layer2.0") else 1.0
    from compress_cli._utils.modules import set_submodule
    from compress_cli.pruning.layers import build_bypasses, choose

    build_bypasses(model, cands, calib)
    for c in choose(cands, 2, "loss"):
        set_submodule(model, c.name, c.bypass)
    # layer1.0's input is already >= 0 (after a ReLU): the ReLU of the bypass is a no-op and left out
    assert isinstance(model.layer1[0], nn.Identity)
    # layer2.0 changes shape: replaced by its downsample path followed by the block's final ReLU
    assert isinstance(model.layer2[0], nn.Sequential) and list(model.layer2[0]._modules) == [
        "conv",
        "bn",
        "post0",
    ]
    with torch.no_grad():
        torch.testing.assert_close(model.layer2(model.layer1(h)), expected)
    assert by["layer2.0"].replacement == "shortcut:downsample"


def test_scores_match_a_hand_computation(calib):
    model = seeded_zoo("digits_resnet").eval()
    cands = [c for c in find_candidates(model, X1) if c.name == "layer1.0"]
    score_candidates(model, cands, calib, "similarity")
    block = model.layer1[0]
    ins = []
    h = block.register_forward_hook(lambda m, i, o: ins.append((i[0], o)))
    with torch.no_grad():
        for x, _ in calib:
            model(x)
    h.remove()
    cos = torch.cat([F.cosine_similarity(o.flatten(1), i.flatten(1), dim=1) for i, o in ins])
    assert cands[0].score == pytest.approx(float(cos.mean()), rel=1e-5)
    score_candidates(model, cands, calib, "loss")
    with torch.no_grad():
        base = sum(float(F.cross_entropy(model(x), y, reduction="sum")) for x, y in calib)
        model.layer1[0] = nn.Identity()
        cut = sum(float(F.cross_entropy(model(x), y, reduction="sum")) for x, y in calib)
    n = sum(len(y) for _, y in calib)
    assert cands[0].score == pytest.approx((cut - base) / n, rel=1e-4, abs=1e-6)


def test_protect_and_output_layer():
    cands = find_candidates(seeded_zoo("digits_resnet").eval(), X1, protect=["layer1.*", "layer3.0.conv1"])
    assert [c.name for c in cands] == ["layer2.0"]
    mlp = nn.Sequential(
        OrderedDict(
            [
                ("flatten", nn.Flatten()),
                ("a", nn.Linear(64, 10)),
                ("relu", nn.ReLU()),
                ("b", nn.Linear(10, 10)),
                ("relu2", nn.ReLU()),
                ("out", nn.Linear(10, 10)),
            ]
        )
    )
    assert [c.name for c in find_candidates(mlp, X1)] == ["b"]  # same-shape layers, never the output layer


class Wrapped(nn.Module):
    """A custom shortcut of this test module (a package the manifest may not name)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def test_a_candidate_whose_bypass_could_not_be_saved_is_left_out(calib):
    """The run would fail to save a block replaced by a custom shortcut: it is no candidate."""
    import functools

    from compress_cli.checkpoint.architecture import describe_problem

    model = seeded_zoo("digits_resnet").eval()
    model.layer2[0].downsample = Wrapped(model.layer2[0].downsample)
    describe = functools.partial(describe_problem, source="zoo:digits_resnet")
    assert {c.name for c in find_candidates(model, X1)} == {"layer1.0", "layer2.0", "layer3.0"}
    left_out: list = []
    cands = find_candidates(model, X1, describe=describe, left_out=left_out)
    assert {c.name for c in cands} == {"layer1.0", "layer3.0"}
    ((name, problem),) = left_out
    assert name == "layer2.0"
    assert problem.startswith(f"module 'layer2.0.shortcut' ({Wrapped.__module__}:Wrapped), inside the new")
    with pytest.raises(StageError, match="1 candidate\\(s\\) left out because the checkpoint could not"):
        drop_layers(model, X1, calib, count=1, protect=["layer1.*", "layer3.*"], describe=describe)


def test_errors(calib):
    with pytest.raises(StageError, match="no removable layer"):
        drop_layers(seeded_zoo("digits_cnn"), X1, calib, count=1)
    with pytest.raises(StageError, match="rounds to no layer"):
        drop_layers(seeded_zoo("digits_resnet"), X1, calib, fraction=0.1)
    for bad in ({}, {"count": 1, "fraction": 0.5}, {"count": 0}, {"importance": "weight"}):
        d = tiny_recipe_dict("/tmp/unused", stages=[{"type": "drop_layers", **bad}])
        with pytest.raises(RecipeError, match="drop_layers"):
            validate(parse_yaml(yaml.safe_dump(d)))


def test_resnet18_32px_blocks_removed_and_rebuilt():
    spec = {"source": "torchvision:resnet18", "kwargs": {"num_classes": 10}}
    model = build_from_source(spec).eval()
    calib = [
        (torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)), torch.tensor([0, 1, 2, 3]))
        for i in range(1)
    ]
    cands, chosen, _ = drop_layers(
        model, torch.randn(1, 3, 32, 32), calib, criterion="similarity", fraction=0.25
    )
    assert len(cands) == 8 and len(chosen) == 2
    diff = json.loads(json.dumps(architecture_diff(build_from_source(spec), model)))
    again = apply_architecture_diff(build_from_source(spec), diff)
    again.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), again.eval()(x))
        assert torch.isfinite(again(x)).all()


def test_stage_run_preview_and_finetune(tmp_path):
    d = tiny_recipe_dict(
        tmp_path,
        stages=[
            {
                "type": "drop_layers",
                "count": 1,
                "importance": "similarity",
                "epochs": 1,
                "max_steps_per_epoch": 2,
            }
        ],
        model={"source": "zoo:digits_resnet"},
        data={"limit_train": 256, "limit_test": 128},
        measure={"latency": None, "macs": False},
    )
    report = run_recipe(validate(parse_yaml(yaml.safe_dump(d))))
    st = report["stages"][0]
    assert len(st["details"]["removed"]) == 1 and st["details"]["finetune"]["epochs_run"] == 1
    assert [c["removed"] for c in st["details"]["candidates"]].count(True) == 1
    model = compress_cli.load(tmp_path / "out" / "model")
    assert isinstance(model.get_submodule(st["details"]["removed"][0]), (nn.Identity, nn.Sequential))

    cls = get_stage("drop_layers")
    state = tiny_state(seeded_zoo("digits_resnet"))
    lines = cls(cls.config_class.model_validate({"type": "drop_layers", "fraction": 0.5})).preview(state)
    assert lines[0].startswith("3 candidate(s)") and sum(x.startswith("*") for x in lines) == 1
    assert any("layer2.0: residual -> shortcut:downsample" in x for x in lines)
    assert not isinstance(state.model.layer1[0], nn.Identity)  # preview does not modify
    skip = cls(cls.config_class.model_validate({"type": "drop_layers", "count": 1, "if_none": "skip"}))
    state = tiny_state(seeded_zoo("digits_cnn"))
    assert skip.run(state).notes.startswith("skipped")


class ProjBlock(nn.Module):
    """RegNet-style: relu(proj(x) + f(x)) with a torchvision Conv2dNormActivation shortcut."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        from torchvision.ops import Conv2dNormActivation

        self.proj = Conv2dNormActivation(cin, cout, 1, stride=2, activation_layer=None)
        self.f = nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout))
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.proj(x) + self.f(x))


def make_proj_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        ProjBlock(4, 8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    ).eval()


def test_sequential_subclass_shortcut_becomes_a_describable_sequential(calib):

    model = make_proj_net()
    cands, chosen, _ = drop_layers(model, X1, calib, criterion="loss", count=1)
    assert [(c.name, c.replacement) for c in chosen] == [("1", "shortcut:proj")]
    assert type(model[1]) is nn.Sequential and [type(m).__name__ for m in model[1]] == [
        "Conv2d",
        "BatchNorm2d",
        "ReLU",
    ]
    diff = json.loads(json.dumps(architecture_diff(make_proj_net(), model)))
    again = apply_architecture_diff(make_proj_net(), diff)
    again.load_state_dict(model.state_dict())
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), again.eval()(x))


def test_a_module_list_is_a_layer_stack_only_when_chained():
    """Children of an nn.ModuleList are candidates when one's output is the next one's input (a
    stack); parallel branches of the same input are not. One called with one tensor keeps the
    Identity bypass."""

    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
            self.branches = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for b in self.blocks:
                x = b(x)
            return self.head(sum(b(x) for b in self.branches))

    torch.manual_seed(0)
    got = {c.name: c.replacement for c in find_candidates(Stack().eval(), torch.randn(2, 4))}
    assert got == {"blocks.0": "identity", "blocks.1": "identity", "blocks.2": "identity"}
