"""Structural edits proven exact (issue 15, items 1 and 5): every channel/head/layer removal is
compared with a zeroed (or bypassed) reference on a batch and refused, located, with the model
left unchanged, when they differ."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import yaml
from torch import nn

from compress_cli.config.yaml import parse_yaml
from compress_cli.engine.run import run_recipe
from compress_cli.errors import StageError
from compress_cli.pruning import ABS_TOL, REL_TOL, attention_heads, drop_layers, layer_widths, prune_channels
from compress_cli.pruning.exactness import compare, zeroed_reference
from compress_cli.stages.registry import get_stage, validate
from compress_cli.testing import digits_bundle, permute_flatten_cnn, seeded_zoo, tiny_recipe_dict, tiny_state

X = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5))


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["digits_cnn", "digits_resnet", "digits_mlp"])
def test_correct_removals_are_exact_and_reported(name):
    model = seeded_zoo(name).eval()
    res = prune_channels(model, X[:1], ratio=0.5, check_inputs=X)
    ex = res.exactness
    assert ex is not None and ex.exact and ex.samples == 4 and ex.first_divergence is None
    assert ex.tolerance == pytest.approx(REL_TOL * float(model(X).detach().abs().max()) + ABS_TOL, rel=0.05)
    assert res.steps[0]["exactness"] == ex.as_dict()


def test_flatten_after_permute_is_refused_located_and_the_model_is_unchanged():
    model = permute_flatten_cnn().eval()
    before = copy.deepcopy(model)
    with pytest.raises(StageError) as e:
        prune_channels(model, X[:1], ratio=0.3, check_inputs=X)
    msg = str(e.value)
    assert "not exact" in msg and "first at layer 'fc'" in msg and "ignore: [conv2]" in msg
    assert model.conv2.out_channels == 16 and same_weights(model, before)
    # the way out the message names works, and is exact
    res = prune_channels(model, X[:1], ratio=0.3, ignore=["conv2"], check_inputs=X)
    assert res.exactness is not None and res.exactness.exact
    assert layer_widths(model) == {"conv1": 5, "conv2": 16, "fc": 10}  # 8 - round(0.3 * 8)


def test_flatten_after_permute_is_refused_before_the_baseline(tmp_path):
    from typer.testing import CliRunner

    from compress_cli.cli import app

    d = tiny_recipe_dict(
        tmp_path,
        model={"source": "compress_cli.testing:permute_flatten_cnn"},
        stages=[{"type": "prune_channels", "ratio": 0.3}],
    )
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(StageError) as e:
        run_recipe(validate(parse_yaml(path.read_text(), str(path))))
    assert e.value.problems[0].startswith("stages[0] (prune_channels)")
    assert "first at layer 'fc'" in e.value.problems[0]
    assert not (tmp_path / "out").exists()  # refused before the baseline wrote anything
    res = CliRunner().invoke(app, ["validate", str(path), "--model"])
    assert res.exit_code == 1 and "first at layer 'fc'" in res.output


def test_a_broken_removal_is_caught_naming_the_first_diverging_layer(monkeypatch):
    """torch-pruning told to drop the wrong classifier columns: caught at 'fc', model unchanged."""
    import torch_pruning as tp

    handler = type(tp.prune_linear_in_channels.__self__)
    real = handler.prune_in_channels

    def wrong_columns(self, layer, idxs):
        return real(self, layer, [(int(i) + 1) % layer.in_features for i in idxs])

    monkeypatch.setattr(handler, "prune_in_channels", wrong_columns)
    model = seeded_zoo("digits_cnn").eval()
    before = copy.deepcopy(model)
    with pytest.raises(StageError, match=r"first at layer 'fc'.*ignore: \[conv2\]"):
        prune_channels(model, X[:1], ratio=0.5, check_inputs=X)
    assert same_weights(model, before)


def test_the_reference_zeroes_consumers_too_so_a_sigmoid_between_is_exact():
    """sigmoid(0) = 0.5: zeroing at the producers alone would not be removal; zeroing the
    consumers' inputs too is."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Sigmoid(), nn.Linear(12, 12), nn.Sigmoid(), nn.Linear(12, 3))
    x = torch.randn(5, 6)
    res = prune_channels(model, x[:1], ratio=0.5, check_inputs=x)
    assert res.exactness is not None and res.exactness.exact
    assert layer_widths(model) == {"0": 6, "2": 6, "4": 3}


def test_zeroed_reference_is_undone_on_exit():
    model = seeded_zoo("digits_mlp").eval()
    with torch.no_grad():
        y = model(X)
    plan = [[]]
    from compress_cli.pruning.exactness import Removal

    plan[0].append(Removal("fc1", True, [0, 1, 2]))
    with zeroed_reference(model, plan) as ref, torch.no_grad():
        assert not torch.equal(ref(X), y)
    with torch.no_grad():
        assert torch.equal(model(X), y)
    assert compare(model, model, X).exact


# --------------------------------------------------------------------------- attention heads
def tiny_vit() -> nn.Module:
    timm = pytest.importorskip("timm")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=10
        )
    return model.eval()


def test_timm_vit_whole_heads_and_mlp_neurons_removed_exactly():
    model = tiny_vit()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert len(attention_heads(model)) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = prune_channels(model, x[:1], ratio=0.25, head_ratio=0.25, check_inputs=x)
    assert res.exactness is not None and res.exactness.exact
    attn = model.blocks[0].attn
    assert res.heads == {"blocks.0.attn.qkv": [3, 2], "blocks.1.attn.qkv": [3, 2]}
    assert attn.num_heads == 2 and attn.attn_dim == 2 * attn.head_dim == attn.qkv.out_features // 3
    assert attn.proj.in_features == 128 and model.blocks[0].mlp.fc1.out_features == 576
    assert "blocks.0.attn.num_heads" in res.synced
    assert model(x).shape == (3, 10)


def test_timm_vit_head_dims_stay_when_no_heads_are_asked():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = prune_channels(model, x[:1], ratio=0.25, check_inputs=x)
    assert res.exactness is not None and res.exactness.exact
    assert model.blocks[0].attn.num_heads == 3 and model.blocks[0].attn.qkv.out_features == 3 * 192


def test_bert_heads_hidden_and_intermediate_removed_exactly_with_dict_inputs():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.BertForSequenceClassification(cfg).eval()
    ids = torch.randint(0, 100, (4, 12), generator=torch.Generator().manual_seed(0))
    res = prune_channels(
        model, {"input_ids": ids[:1]}, ratio=0.25, head_ratio=0.5, check_inputs={"input_ids": ids}
    )
    assert res.exactness is not None and res.exactness.exact and res.exactness.samples == 4
    sa = model.bert.encoder.layer[0].attention.self
    assert sa.num_attention_heads == 2 and sa.all_head_size == 16 == sa.query.out_features
    assert model.bert.encoder.layer[0].intermediate.dense.out_features == 48
    assert model(input_ids=ids).logits.shape == (4, 2)


# --------------------------------------------------------------------------- drop_layers
@pytest.fixture(scope="module")
def calib():
    return digits_bundle(limit_train=256).calibration()[:2]


def test_drop_layers_reports_exactness_and_catches_a_broken_replacement(calib, monkeypatch):
    import compress_cli.pruning.layers as L

    model = seeded_zoo("digits_resnet").eval()
    _, chosen, ex = drop_layers(model, X[:1], calib, criterion="activation", count=1, check_inputs=X)
    assert ex.exact and ex.samples == 4 and len(chosen) == 1

    real = L.set_submodule

    def broken(model, name, new):  # a replacement that is not the bypass it claims to be
        return real(model, name, nn.Sequential(new, nn.Tanh()))

    monkeypatch.setattr(L, "set_submodule", broken)
    model = seeded_zoo("digits_resnet").eval()
    before = copy.deepcopy(model)
    with pytest.raises(StageError) as e:
        drop_layers(model, X[:1], calib, criterion="activation", count=1, check_inputs=X)
    name = chosen[0].name
    assert "layer removal is not exact" in str(e.value) and f"first at '{name}'" in str(e.value)
    assert f"protect: [{name}]" in str(e.value)
    assert same_weights(model, before) and not isinstance(model.get_submodule(name), nn.Sequential)


def test_drop_layers_without_candidates_is_refused_before_the_baseline(tmp_path):
    from typer.testing import CliRunner

    from compress_cli.cli import app

    cls = get_stage("drop_layers")
    stage = cls(cls.config_class.model_validate({"type": "drop_layers", "count": 1}))
    with pytest.raises(StageError, match="no removable layer.*if_none: skip"):
        stage.preflight(tiny_state(seeded_zoo("digits_cnn")))
    skip = cls(cls.config_class.model_validate({"type": "drop_layers", "count": 1, "if_none": "skip"}))
    skip.preflight(tiny_state(seeded_zoo("digits_cnn")))  # skipping is allowed
    stage.preflight(tiny_state(seeded_zoo("digits_resnet")))  # candidates: fine

    d = tiny_recipe_dict(
        tmp_path, model={"source": "zoo:digits_cnn"}, stages=[{"type": "drop_layers", "count": 1}]
    )
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(StageError) as e:
        run_recipe(validate(parse_yaml(path.read_text(), str(path))))
    assert e.value.problems[0].startswith("stages[0] (drop_layers)")
    assert not (tmp_path / "out").exists()
    res = CliRunner().invoke(app, ["validate", str(path), "--model"])
    assert res.exit_code == 1 and "no removable layer" in res.output


def test_stage_details_carry_the_exactness(tmp_path):
    cls = get_stage("prune_channels")
    state = tiny_state(seeded_zoo("digits_cnn"), tmp_path)
    stage = cls(cls.config_class.model_validate({"type": "prune_channels", "ratio": 0.5}))
    stage.preflight(state)
    assert state.model.conv1.out_channels == 16  # the preflight prunes a copy
    out = stage.run(state)
    ex = out.details["exactness"]
    assert ex["max_abs_diff"] <= ex["tolerance"] and ex["samples"] == 4
    assert "exact (max |diff|" in out.notes


@pytest.mark.slow
def test_timm_vit_stage_run_saves_and_reloads(tmp_path):
    """The stage path on a timm ViT: heads removed, exact, saved and reloaded equal (about 20 s)."""
    pytest.importorskip("timm")
    import compress_cli

    kwargs = {"model_name": "vit_tiny_patch16_224", "pretrained": False, "img_size": 32}
    d = tiny_recipe_dict(
        tmp_path,
        model={"source": "timm:create_model", "kwargs": {**kwargs, "patch_size": 8, "depth": 2}},
        data={"source": "synthetic", "input_shape": [3, 32, 32], "num_classes": 10, "limit_test": 64},
        measure={"latency": None, "macs": False},
        stages=[{"type": "prune_channels", "ratio": 0.25, "head_ratio": 0.25}],
    )
    d["model"]["kwargs"]["num_classes"] = 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = run_recipe(validate(parse_yaml(yaml.safe_dump(d))))
    st = report["stages"][0]
    assert st["details"]["heads"] == {"blocks.0.attn.qkv": [3, 2], "blocks.1.attn.qkv": [3, 2]}
    assert st["details"]["exactness"]["max_abs_diff"] <= st["details"]["exactness"]["tolerance"]
    model = compress_cli.load(tmp_path / "out" / "model", trust_source=True)
    assert model.blocks[0].attn.num_heads == 2


def test_a_runaway_dependency_search_is_refused_located_and_the_model_kept(monkeypatch):
    """torch-pruning's group search ran for over 5 minutes on timm's rexnet_100; a group past
    GROUP_ENTRIES_PER_MODULE entries per module now stops it (rexnet_100: refused in 14 s; real
    groups measured at most 180 entries, vit_tiny)."""
    import torch_pruning as tp

    import compress_cli.pruning.channels as channels

    model = seeded_zoo("digits_cnn")
    before = copy.deepcopy(model)
    add_dep = tp.dependency.group.Group.add_dep
    monkeypatch.setattr(channels, "GROUP_ENTRIES_PER_MODULE", 0)  # every group is a runaway
    with pytest.raises(StageError, match="dependency search ran away on this model") as e:
        prune_channels(model, X[:1], importance="l1", ratio=0.3)
    assert "ignore: [module globs]" in str(e.value)
    assert tp.dependency.group.Group.add_dep is add_dep  # the library is left as it was
    assert same_weights(model, before)
    monkeypatch.setattr(channels, "GROUP_ENTRIES_PER_MODULE", 20)
    prune_channels(model, X[:1], importance="l1", ratio=0.3)  # the real bound passes a real model


def test_an_index_mapping_blowup_through_a_flatten_is_refused_before_it_is_built(monkeypatch):
    """Each channel index mapped through a flatten becomes one per spatial position; chained
    reshapes multiply them (timm's coatnet_nano_rw_224 reached 13 GB). Past INDEX_MAPPING_LIMIT the
    search stops with the way out, the model and torch-pruning left as they were."""
    from torch_pruning.dependency.index_mapping import _FlattenIndexMapping

    import compress_cli.pruning.channels as channels

    model = seeded_zoo("digits_cnn")  # its classifier reads a flattened conv map
    before = copy.deepcopy(model)
    call = _FlattenIndexMapping.__call__
    monkeypatch.setattr(channels, "INDEX_MAPPING_LIMIT", 8)
    with pytest.raises(StageError, match=r"flatten/reshape would make [\d,]+ channel indices") as e:
        prune_channels(model, X[:1], importance="l1", ratio=0.3)
    assert "ignore: [module globs]" in str(e.value)
    assert _FlattenIndexMapping.__call__ is call and same_weights(model, before)
    monkeypatch.setattr(channels, "INDEX_MAPPING_LIMIT", 1 << 21)
    prune_channels(model, X[:1], importance="l1", ratio=0.3)  # the real limit passes it
