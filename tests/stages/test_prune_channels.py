from __future__ import annotations

import json

import pytest
import torch
import yaml
from torch import nn

import compress_cli
from compress_cli import load
from compress_cli.checkpoint import apply_architecture_diff, architecture_diff, save_model
from compress_cli.config.yaml import parse_yaml
from compress_cli.engine.run import run_recipe
from compress_cli.errors import RecipeError, StageError
from compress_cli.pruning import IMPORTANCES, layer_widths, prune_channels
from compress_cli.sources.models import build_from_source
from compress_cli.stages.registry import get_stage, validate
from compress_cli.testing import digits_bundle, seeded_zoo, tiny_recipe_dict, tiny_state

X = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def calib():
    return digits_bundle(limit_train=256).calibration()[:2]


def rebuild_equal(model: nn.Module, spec: dict, shape: tuple[int, ...]) -> nn.Module:
    """The architecture-diff path of load() without the (slow for 11M weights) lzma encoding."""
    diff = json.loads(json.dumps(architecture_diff(build_from_source(spec), model)))
    again = apply_architecture_diff(build_from_source(spec), diff)
    again.load_state_dict(model.state_dict())
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), again.eval()(x))
    return again


def reload_equal(model: nn.Module, spec: dict, tmp_path, shape=(1, 8, 8)) -> nn.Module:
    save_model(
        model,
        tmp_path / "m",
        base=build_from_source(spec),
        model_spec=spec,
        input_shape=list(shape),
        num_classes=10,
    )
    again = load(tmp_path / "m")
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        y = model(x)
        assert torch.isfinite(y).all()
        assert torch.equal(y, again(x))
    return again


def test_widths_shapes_and_reload_digits_cnn(tmp_path):
    model = seeded_zoo("digits_cnn").eval()
    res = prune_channels(model, X[:1], ratio=0.5)
    assert model.conv1.out_channels == 8 and model.bn1.num_features == 8
    assert model.conv2.in_channels == 8 and model.conv2.out_channels == 16
    assert model.fc.in_features == 16 * 16 and model.fc.out_features == 10  # the output layer keeps its width
    assert res.width_table() == {"conv1": [16, 8], "conv2": [32, 16], "fc": [10, 10]}
    assert res.ignored == ["fc"]
    again = reload_equal(model, {"source": "zoo:digits_cnn", "kwargs": {}}, tmp_path)
    assert again.conv2.weight.shape == (16, 8, 3, 3)


def test_residual_partners_follow_and_reload_digits_resnet(tmp_path):
    model = seeded_zoo("digits_resnet").eval()
    prune_channels(model, X[:1], ratio=0.5, importance="l2")
    w = layer_widths(model)
    # the stem and layer1's block add into the same tensor: they must keep one width
    assert w["conv1"] == w["layer1.0.conv2"] == 8
    assert w["layer2.0.conv2"] == w["layer2.0.downsample.conv"] == 16
    reload_equal(model, {"source": "zoo:digits_resnet", "kwargs": {}}, tmp_path)


def _dead_channel_cnn() -> nn.Module:
    """digits_cnn with 8 of conv1's 16 channels contributing exactly nothing."""
    model = seeded_zoo("digits_cnn").eval()
    dead = torch.arange(0, 16, 2)
    with torch.no_grad():
        model.conv1.weight[dead] = 0
        model.bn1.weight[dead] = 0
        model.bn1.bias[dead] = 0
        model.bn1.running_mean[dead] = 0
        model.conv2.weight[:, dead] = 0
    return model


@pytest.mark.parametrize("importance", IMPORTANCES)
def test_every_criterion_removes_the_dead_channels(importance, calib):
    model = _dead_channel_cnn()
    with torch.no_grad():
        before = model(X)
    prune_channels(model, X[:1], importance=importance, ratio=0.5, ignore=["conv2"], calibration=calib)
    assert model.conv1.out_channels == 8 and model.conv2.out_channels == 32
    assert (model.conv1.weight.flatten(1).abs().sum(1) > 0).all(), "a live channel was removed"
    with torch.no_grad():
        torch.testing.assert_close(model(X), before, rtol=1e-5, atol=1e-5)


def test_criteria_rank_differently(calib):
    kept = {}
    for imp in ("l1", "activation", "taylor"):
        model = seeded_zoo("digits_cnn").eval()
        ref = model.conv1.weight.detach().clone()
        prune_channels(model, X[:1], importance=imp, ratio=0.5, ignore=["conv2"], calibration=calib)
        w = model.conv1.weight.detach()
        kept[imp] = tuple(int((ref == w[i]).flatten(1).all(1).nonzero()[0]) for i in range(w.shape[0]))
    assert len(set(kept.values())) > 1


def test_ignore_globs_layer_ratios_and_global_scope():
    model = seeded_zoo("digits_cnn").eval()
    prune_channels(model, X[:1], ratio=0.5, ignore=["conv1"])
    assert model.conv1.out_channels == 16 and model.conv2.out_channels == 16
    model = seeded_zoo("digits_cnn").eval()
    prune_channels(model, X[:1], ratio=0.5, layer_ratios={"conv1": 0.25})
    assert model.conv1.out_channels == 12 and model.conv2.out_channels == 16
    model = seeded_zoo("digits_mlp").eval()
    x = torch.randn(2, 1, 8, 8)
    prune_channels(model, x[:1], ratio=0.5, scope="global", max_ratio=0.75)
    w = layer_widths(model)
    assert w["fc3"] == 10 and w["fc1"] + w["fc2"] == (128 + 64) // 2
    assert w["fc1"] >= 32 and w["fc2"] >= 16  # max_ratio bounds each layer
    with pytest.raises(StageError, match="matches no prunable"):
        prune_channels(seeded_zoo("digits_cnn"), X[:1], layer_ratios={"nope*": 0.5})


def test_output_layer_always_kept_and_bn_scale_needs_bn():
    model = seeded_zoo("digits_mlp").eval()
    prune_channels(model, torch.randn(1, 1, 8, 8), ratio=0.9)
    assert model.fc3.out_features == 10 and model.fc1.out_features == 12
    with pytest.raises(StageError, match="batch norm"):
        prune_channels(seeded_zoo("digits_mlp"), torch.randn(1, 1, 8, 8), importance="bn_scale")


def test_unstructured_masks_are_made_permanent_first(tmp_path):
    from torch.nn.utils import prune

    model = seeded_zoo("digits_cnn").eval()
    prune.l1_unstructured(model.conv2, "weight", amount=0.5)
    res = prune_channels(model, X[:1], ratio=0.25)
    assert res.folded_masks == ["conv2.weight"]
    assert not hasattr(model.conv2, "weight_orig") and model.conv2.out_channels == 24
    reload_equal(model, {"source": "zoo:digits_cnn", "kwargs": {}}, tmp_path)


def test_resnet18_32px_round_to_and_reload(tmp_path):
    spec = {"source": "torchvision:resnet18", "kwargs": {"num_classes": 10}}
    model = build_from_source(spec).eval()
    res = prune_channels(model, torch.randn(1, 3, 32, 32), ratio=0.3, round_to=8)
    w = layer_widths(model)
    assert w["fc"] == 10 and w["layer4.1.conv2"] == w["layer4.0.downsample.0"]
    assert all(v % 8 == 0 for n, v in w.items() if n != "fc")
    assert res.channels_removed > 0 and w["conv1"] < 64
    rebuild_equal(model, spec, (3, 32, 32))


def test_stage_iterative_with_finetune_reports_widths(tmp_path):
    d = tiny_recipe_dict(
        tmp_path,
        stages=[
            {
                "type": "prune_channels",
                "ratio": 0.5,
                "importance": "activation",
                "steps": 2,
                "epochs": 1,
                "max_steps_per_epoch": 2,
                "lr": 0.001,
            }
        ],
        model={"source": "zoo:digits_cnn"},
        data={"limit_train": 256, "limit_test": 128},
        measure={"latency": None, "macs": False},
    )
    report = run_recipe(validate(parse_yaml(yaml.safe_dump(d))))
    st = report["stages"][0]
    assert st["details"]["widths"]["conv2"] == [32, 16] and st["details"]["widths"]["fc"] == [10, 10]
    assert [s["step"] for s in st["details"]["steps"]] == [1, 2]
    assert len(st["details"]["finetune"]) == 1 and st["details"]["finetune"][0]["epochs_run"] == 1
    assert st["metrics"]["params"] < report["baseline"]["params"]
    assert report["edits"][0]["op"] == "prune_channels"
    model = compress_cli.load(tmp_path / "out" / "model")
    assert model.conv2.out_channels == 16


def test_config_validation_and_preview():
    cls = get_stage("prune_channels")
    for bad in ({"ratio": 1.0}, {"layer_ratios": {"conv1": 1.5}}, {"importance": "l3"}, {"round_to": 0}):
        d = tiny_recipe_dict("/tmp/unused", stages=[{"type": "prune_channels", **bad}])
        with pytest.raises(RecipeError, match="prune_channels"):
            validate(parse_yaml(yaml.safe_dump(d)))
    state = tiny_state(seeded_zoo("digits_cnn"))
    stage = cls(
        cls.config_class.model_validate(
            {"type": "prune_channels", "ignore": ["conv1"], "layer_ratios": {"conv9": 0.5}}
        )
    )
    lines = stage.preview(state)
    assert "width kept: conv1, fc" in lines and any("matches nothing" in x for x in lines)
    assert state.model.conv1.out_channels == 16  # preview does not modify


def test_channel_shuffle_and_window_partition_are_refused_before_anything_runs(tmp_path):
    """torch-pruning cannot follow a reshape into 5+ dims (ShuffleNet fails, Swin/MaxViT exhaust
    memory): the run refuses at the start, located, with nothing written; validate --model too."""
    from typer.testing import CliRunner

    from compress_cli.cli import app
    from compress_cli.pruning import high_rank_reshapes

    found = high_rank_reshapes(
        build_from_source({"source": "torchvision:shufflenet_v2_x0_5", "kwargs": {"num_classes": 10}}),
        torch.randn(1, 3, 32, 32),
    )
    assert found[0] == "stage2.0: view [1, 48, 4, 4] -> [1, 2, 24, 4, 4]" and len(found) == 16
    assert high_rank_reshapes(build_from_source({"source": "zoo:digits_resnet"}), X[:1]) == []
    d = tiny_recipe_dict(
        tmp_path,
        model={"source": "torchvision:shufflenet_v2_x0_5", "kwargs": {"num_classes": 10}},
        data={"source": "synthetic", "input_shape": [3, 32, 32], "num_classes": 10},
        stages=[
            {"type": "prune", "sparsity": 0.5},
            {
                "type": "hpo",
                "n_trials": 2,
                "space": {"prune_channels.ratio": {"float": [0.2, 0.4]}},
                "stages": [{"type": "prune_channels", "ratio": 0.3}],
            },
            {"type": "prune_channels", "ratio": 0.3},
        ],
    )
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(StageError) as e:
        run_recipe(validate(parse_yaml(path.read_text(), str(path))))
    assert [p.split(":")[0] for p in e.value.problems] == [
        "stages[1].stages[0] (prune_channels)",
        "stages[2] (prune_channels)",
    ]
    assert "stage2.0: view [1, 48, 4, 4] -> [1, 2, 24, 4, 4], and 15 more" in e.value.problems[1]
    assert "use prune (unstructured), drop_layers" in e.value.problems[1].lower()
    assert not (tmp_path / "out").exists()  # refused before the baseline or stage 1 wrote anything
    res = CliRunner().invoke(app, ["validate", str(path), "--model"])
    assert res.exit_code == 1 and "1. prune" in res.output and "stages[2] (prune_channels)" in res.output
