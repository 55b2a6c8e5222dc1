"""prune stage: sparsity targets, head/include/exclude/overrides, cubic schedule, masks holding
through training, sensitivity allocation, composition, checkpoint round trip, validation."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

import compress_cli
from compress_cli import pruning as P
from compress_cli.config.yaml import parse_yaml
from compress_cli.engine.setup import build_state
from compress_cli.errors import RecipeError, StageError
from compress_cli.stages.registry import get_stage, validate
from compress_cli.state import save_snapshot
from compress_cli.testing import tiny_recipe_dict
from compress_cli.training import TrainOptions, train


def make_state(tmp_path, model="zoo:digits_mlp", **data):
    d = tiny_recipe_dict(tmp_path, model={"source": model}, data={"limit_train": 400, **data})
    return build_state(validate(parse_yaml(yaml.safe_dump(d))), torch.device("cpu"), tmp_path / "out")


def run_stage(state, **cfg):
    cls = get_stage("prune")
    return cls(cls.config_class.model_validate({"type": "prune", **cfg})).run(state)


def zeros(m) -> float:
    w = P.effective_weight(m)
    return float((w == 0).float().mean())


@pytest.fixture
def state(tmp_path):
    return make_state(tmp_path)


def test_global_sparsity_reached_and_head_left_alone(state):
    res = run_stage(state, sparsity=0.7)
    m = state.model
    n1, n2 = m.fc1.weight.numel(), m.fc2.weight.numel()
    z = float((P.effective_weight(m.fc1) == 0).sum() + (P.effective_weight(m.fc2) == 0).sum())
    assert z == round(0.7 * (n1 + n2))
    assert zeros(m.fc1) != pytest.approx(zeros(m.fc2), abs=1e-3)  # ranked together, not per layer
    assert res.details["head"] == "fc3" and not res.details["head_pruned"]
    assert not P.is_pruned(m.fc3) and zeros(m.fc3) == 0
    assert res.details["overall_sparsity"] == pytest.approx(0.7, abs=1e-4)


def test_layer_scope_prunes_each_layer_to_the_target(state):
    run_stage(state, sparsity=0.6, scope="layer", include_head=True)
    for m in (state.model.fc1, state.model.fc2, state.model.fc3):
        assert zeros(m) == pytest.approx(0.6, abs=1 / m.weight.numel())


def test_include_exclude_and_overrides(state):
    run_stage(state, sparsity=0.5, exclude=["fc2"], include_head=True, layers={"fc3": 0.2})
    m = state.model
    assert zeros(m.fc1) == pytest.approx(0.5, abs=1e-3)
    assert zeros(m.fc3) == pytest.approx(0.2, abs=2e-3)
    assert zeros(m.fc2) == 0 and not P.is_pruned(m.fc2)


def test_include_nothing_and_unmatched_override_are_stage_errors(state):
    with pytest.raises(StageError, match="no prunable layer"):
        run_stage(state, sparsity=0.5, include=["nope*"])
    with pytest.raises(StageError, match="'conv\\*' match no selected layer"):
        run_stage(state, sparsity=0.5, layers={"conv*": 0.5})
    with pytest.raises(StageError, match="head 'fc3' is left out"):
        run_stage(state, sparsity=0.5, include=["fc3"])


def test_cubic_schedule_values():
    s = P.cubic_schedule(0.0, 0.9, 4)
    assert s == pytest.approx([0.9 - 0.9 * (1 - k / 4) ** 3 for k in range(1, 5)])
    assert s[-1] == pytest.approx(0.9) and all(a < b for a, b in zip(s, s[1:], strict=False))
    # steep first, gentle last: the increments shrink
    inc = [b - a for a, b in zip([0.0, *s], s, strict=False)]
    assert all(a > b for a, b in zip(inc, inc[1:], strict=False))
    assert P.cubic_schedule(0.5, 0.8, 2) == pytest.approx([0.8 - 0.3 / 8, 0.8])


def test_gradual_schedule_follows_the_cubic_curve_and_fine_tunes(state):
    res = run_stage(
        state, sparsity=0.8, schedule={"steps": 3, "finetune_epochs": 1, "lr": 0.01, "max_steps_per_epoch": 3}
    )
    want = P.cubic_schedule(0.0, 0.8, 3)
    got = [h["sparsity"] for h in res.details["schedule"]]
    assert got == pytest.approx(want, abs=1e-3)
    assert all(h["epochs"] == 1 and "val_accuracy" in h for h in res.details["schedule"])
    assert get_stage("prune").trains(
        get_stage("prune").config_class.model_validate(
            {"type": "prune", "sparsity": 0.5, "schedule": {"steps": 2}}
        )
    )


@pytest.mark.parametrize(
    "opts",
    [
        {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.05, "lr": 0.05},
        {"optimizer": "adamw", "weight_decay": 0.1, "lr": 0.01},
    ],
    ids=["sgd-momentum-wd", "adamw"],
)
def test_masks_hold_exactly_through_later_training(state, opts):
    run_stage(state, sparsity=0.8, include_head=True)
    before = {k: v.clone() for k, v in P.masks(state.model).items()}
    train(state.model, state, TrainOptions(epochs=2, max_steps_per_epoch=5, **opts))
    sd = compress_cli.checkpoint.export_state_dict(state.model)
    for key, keep in before.items():
        w = sd[key]
        assert torch.all(w[~keep] == 0), key  # exactly zero, not just small
        assert torch.all(P.effective_weight(state.model.get_submodule(key.rsplit(".", 1)[0]))[~keep] == 0)
    assert all(torch.equal(before[k], v) for k, v in P.masks(state.model).items())
    # the trained weights did move
    orig = state.original.fc1.weight
    assert not torch.equal(sd["fc1.weight"][before["fc1.weight"]], orig[before["fc1.weight"]])


def test_second_prune_composes_cumulatively(state):
    run_stage(state, sparsity=0.5, scope="layer")
    first = {k: v.clone() for k, v in P.masks(state.model).items()}
    run_stage(state, sparsity=0.8, scope="layer")
    for key, keep in P.masks(state.model).items():
        assert not torch.any(keep & ~first[key])  # everything masked before stays masked
        assert float((~keep).float().mean()) == pytest.approx(0.8, abs=2e-3)
    res = run_stage(state, sparsity=0.6, scope="layer")  # below what is there: nothing to do
    assert res.details["overall_sparsity"] == pytest.approx(0.8, abs=2e-3)


def test_reloaded_sparse_checkpoint_prunes_its_zeros_first(state, tmp_path):
    run_stage(state, sparsity=0.7)
    P.make_permanent(state.model)  # as after compress_cli.load(): plain weights with zeros
    zero_before = P.effective_weight(state.model.fc1) == 0
    run_stage(state, sparsity=0.8)
    assert torch.all(P.effective_weight(state.model.fc1)[zero_before] == 0)


def test_deepcopy_works_after_prune_and_after_a_training_forward(state):
    run_stage(state, sparsity=0.5)
    copy.deepcopy(state.model)
    state.model.train()
    state.model(torch.randn(4, 1, 8, 8)).sum().backward()
    c = copy.deepcopy(state.model)
    x = torch.randn(3, 1, 8, 8)
    state.model.eval()
    assert torch.equal(c.eval()(x), state.model(x))


def test_remove_and_apply_masks_round_trip(state):
    run_stage(state, sparsity=0.6)
    x = torch.randn(5, 1, 8, 8)
    y = state.model.eval()(x)
    found = P.masks(state.model)
    P.make_permanent(state.model)
    assert set(found) == {"fc1.weight", "fc2.weight"}
    assert not any(k.endswith(("_orig", "_mask")) for k in state.model.state_dict())
    assert isinstance(state.model.fc1.weight, torch.nn.Parameter)
    assert torch.equal(state.model(x), y)
    P.apply_masks(state.model, found)
    assert P.is_pruned(state.model.fc1)
    assert all(torch.equal(found[k], v) for k, v in P.masks(state.model).items())


def test_checkpoint_reload_is_exact_and_smaller(state, tmp_path):
    dense = save_snapshot(state, tmp_path / "dense")
    run_stage(state, sparsity=0.9, include_head=True)
    size = save_snapshot(state, tmp_path / "pruned")
    assert size < dense / 3
    manifest = compress_cli.checkpoint.read_manifest(tmp_path / "pruned")
    assert compress_cli.checkpoint.tensor_encodings(tmp_path / "pruned")["fc1.weight"].split("+")[0] in (
        "sparse",
        "gaps",
    )
    assert manifest["edits"][-1]["op"] == "prune"
    loaded = compress_cli.load(tmp_path / "pruned")
    x = torch.randn(16, 1, 8, 8)
    assert torch.equal(loaded(x), state.model.eval()(x))
    assert torch.equal(loaded.fc1.weight, P.effective_weight(state.model.fc1))


# --------------------------------------------------------------------------- sensitivity
def test_allocate_gives_the_sensitive_layer_less():
    scan = P.SensitivityScan(ratios=[0.5, 0.7, 0.9], baseline_accuracy=0.9)
    scan.drops = {"fragile": [1.0, 5.0, 20.0], "robust": [0.0, 0.1, 0.5]}
    scan.numel = {"fragile": 1000, "robust": 1000}
    a = P.allocate(scan, 0.7)
    assert a["fragile"] < a["robust"]
    assert (a["fragile"] + a["robust"]) / 2 == pytest.approx(0.7, abs=1e-6)
    with pytest.raises(ValueError, match="add larger sensitivity.ratios"):
        P.allocate(scan, 0.95)


def test_sensitivity_scan_prefers_the_robust_layer(tmp_path):
    """fc2 is trained with 90% of its weights masked, then given back as tiny nonzero values: it
    can lose them for free, while fc1 (same size) cannot lose 90% of its trained weights."""
    state = make_state(tmp_path)
    torch.manual_seed(0)
    P.prune_layer(state.model.fc2, 0.9)
    train(state.model, state, TrainOptions(epochs=4, lr=0.01))
    P.make_permanent(state.model)
    with torch.no_grad():
        w = state.model.fc2.weight
        w[w == 0] = 1e-7
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    res = run_stage(state, sparsity=0.6, sensitivity={"ratios": [0.3, 0.6, 0.9]})
    sens = res.details["sensitivity"]
    chosen = sens["chosen"]
    assert chosen["fc2"] > chosen["fc1"]
    assert chosen["fc2"] >= 0.85
    assert res.details["overall_sparsity"] == pytest.approx(0.6, abs=1e-3)
    rows = {r["layer"]: r for r in sens["table"]}
    assert set(rows) == {"fc1", "fc2"} and rows["fc1"]["0.9"] > rows["fc2"]["0.9"]
    # the scan itself left no trace: only the final pruning changed the weights
    assert all(
        torch.equal(
            P.effective_weight(state.model.get_submodule(n))[
                P.effective_weight(state.model.get_submodule(n)) != 0
            ],
            before[f"{n}.weight"][P.effective_weight(state.model.get_submodule(n)) != 0],
        )
        for n in ("fc1", "fc2")
    )


# --------------------------------------------------------------------------- validation
def _validate(stage_yaml: str):
    text = "version: 1\nname: t\nmodel: {source: 'zoo:digits_mlp'}\nstages:\n" + stage_yaml
    return validate(parse_yaml(text, "r.yaml"))


def test_sparsity_out_of_range_is_a_located_recipe_error():
    with pytest.raises(
        RecipeError, match=r"r\.yaml:6: stages\[0\] \(prune\)\.sparsity: .*less than 1 \(got 1\.5\)"
    ):
        _validate("  - type: prune\n    sparsity: 1.5\n")


def test_schedule_and_sensitivity_validation():
    with pytest.raises(
        RecipeError, match=r"stages\[0\] \(prune\)\.schedule\.stepz: unknown key \(did you mean 'steps'\?\)"
    ):
        _validate("  - type: prune\n    sparsity: 0.5\n    schedule: {stepz: 3}\n")
    with pytest.raises(RecipeError, match=r"initial_sparsity \(0\.6\) must be below sparsity \(0\.5\)"):
        _validate("  - type: prune\n    sparsity: 0.5\n    schedule: {steps: 3, initial_sparsity: 0.6}\n")
    with pytest.raises(RecipeError, match=r"sensitivity\.ratios\[1\]: must be less than 1 \(got 1\.0\)"):
        _validate("  - type: prune\n    sparsity: 0.5\n    sensitivity: {ratios: [0.5, 1.0]}\n")
    with pytest.raises(RecipeError, match=r"layers\.fc1: .*less than 1"):
        _validate("  - type: prune\n    sparsity: 0.5\n    layers: {fc1: 2}\n")
    r = _validate(
        "  - type: prune\n    sparsity: 0.5\n    schedule: {steps: 3, finetune_epochs: 2, lr: 0.1}\n"
    )
    assert r.stages[0].schedule.epochs == 2 and r.stages[0].schedule.lr == 0.1


def test_preview_names_layers_and_the_head(state):
    cls = get_stage("prune")
    lines = cls(
        cls.config_class.model_validate({"type": "prune", "sparsity": 0.5, "layers": {"fc2": 0.3}})
    ).preview(state)
    assert lines == [
        "fc1 (8192 weights): global 0.5",
        "fc2 (8192 weights): 0.3",
        "fc3: classifier head, not pruned",
    ]
    assert not any(P.is_pruned(m) for m in state.model.modules())


def test_prune_global_gives_torch_global_unstructureds_masks_and_exact_counts():
    """Our lean global ranking (one kthvalue) against torch.nn.utils.prune.global_unstructured,
    one shot and cumulative; with ties at the threshold the count is still exact."""
    import torch.nn.utils.prune as tprune

    def layers(seed):
        g = torch.Generator().manual_seed(seed)
        mods = [torch.nn.Linear(40, 30), torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(30, 10)]
        with torch.no_grad():
            for m in mods:
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (1 + len(m.weight.shape)))
        return mods

    ours, ref = layers(0), layers(0)
    for sparsity in (0.5, 0.8):
        P.prune_global(ours, sparsity)
        total = sum(m.weight.numel() for m in ref)
        already = sum(int((m.weight_mask == 0).sum()) for m in ref if hasattr(m, "weight_mask"))
        tprune.global_unstructured(
            [(m, "weight") for m in ref],
            pruning_method=tprune.L1Unstructured,
            amount=round(sparsity * total) - already,
        )
        for a, b in zip(ours, ref, strict=True):
            assert torch.equal(a.weight_mask, b.weight_mask) and torch.equal(a.weight, b.weight)
    tied = [torch.nn.Linear(10, 10), torch.nn.Linear(10, 10)]
    with torch.no_grad():
        for m in tied:
            m.weight.fill_(0.5)
    assert P.prune_global(tied, 0.35) == 70
    assert sum(int((m.weight == 0).sum()) for m in tied) == 70
