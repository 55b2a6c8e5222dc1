"""Guards (fail / revert / warn, per stage and at the end) and the time budget."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import compress_cli
from compress_cli.errors import GuardError
from compress_cli.stages.base import Stage, StageConfig, StageResult
from compress_cli.stages.registry import _REGISTRY, register_stage
from compress_cli.testing import tiny_recipe_dict


class ScrambleConfig(StageConfig):
    """Test-only stage."""


class Scramble(Stage[ScrambleConfig]):
    """Test-only stage: zeroes every weight (accuracy falls to chance)."""

    def run(self, state):
        with torch.no_grad():
            for p in state.model.parameters():
                p.zero_()
        return StageResult(notes="scrambled")


class OverBudget(Scramble):
    """Test-only stage: scrambles, and reports that it missed a limit of its own (as quantize's
    max_accuracy_drop does when the fallback cannot meet it)."""

    def run(self, state):
        res = super().run(state)
        res.violations = ["quantize.max_accuracy_drop: missed"]
        return res


@pytest.fixture
def scramble():
    register_stage("test_scramble")(Scramble)
    register_stage("test_over_budget")(OverBudget)
    yield
    _REGISTRY.pop("test_scramble", None)
    _REGISTRY.pop("test_over_budget", None)


def run(tmp_path, stages, **over):
    d = tiny_recipe_dict(
        tmp_path,
        stages=stages,
        measure={"latency": None},
        model={"source": "zoo:digits_cnn", "checkpoint": "models/digits_cnn.safetensors"},
        **over,
    )
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(d))
    return compress_cli.run(p, force=True)


def report(tmp_path):
    return json.loads((tmp_path / "out" / "report.json").read_text())


def test_final_violation_fails_and_keeps_the_last_good_result(tmp_path, scramble):
    with pytest.raises(
        GuardError,
        match=r"(?s)max_accuracy_drop: accuracy fell "
        r".*kept the last result that satisfies every guard \(stage 1\)",
    ):
        run(tmp_path, [{"type": "evaluate"}, {"type": "test_scramble"}], guard={"max_accuracy_drop": 1.0})
    r = report(tmp_path)
    assert r["final"]["result_from_stage"] == 1 and r["final"]["accuracy"] > 0.95
    model = compress_cli.load(tmp_path / "out" / "model")
    assert any(p.abs().sum() > 0 for p in model.parameters())  # the scrambled model was not kept


def test_stage_revert_restores_and_continues(tmp_path, scramble):
    out = run(
        tmp_path,
        [{"type": "test_scramble", "on_violation": "revert"}, {"type": "evaluate"}],
        guard={"max_accuracy_drop": 1.0},
    )
    s1 = out["stages"][0]
    assert s1["reverted"] and s1["rejected_metrics"]["accuracy"] < 0.3
    assert out["final"]["accuracy"] == out["baseline"]["accuracy"]
    assert out["guard"]["violations"] == []
    assert (tmp_path / "out" / "stages" / "01-test_scramble" / "rejected" / "manifest.json").is_file()


def test_stage_fail_stops_at_once(tmp_path, scramble):
    with pytest.raises(GuardError):
        run(
            tmp_path,
            [{"type": "test_scramble", "on_violation": "fail"}, {"type": "evaluate"}],
            guard={"max_accuracy_drop": 1.0},
        )
    r = report(tmp_path)
    assert [s["type"] for s in r["stages"]] == ["test_scramble"]
    assert r["final"]["result_from_stage"] == 0


def test_warn_keeps_going_and_exits_ok(tmp_path, scramble):
    out = run(tmp_path, [{"type": "test_scramble"}], guard={"max_accuracy_drop": 1.0, "on_violation": "warn"})
    assert out["guard"]["violations"] and out["stages"][0]["guard_violations"]


def test_a_stage_own_violation_fails_like_the_guard_and_its_result_is_saved(tmp_path, scramble):
    with pytest.raises(GuardError, match=r"(?s)quantize.max_accuracy_drop: missed.*\(the baseline\)"):
        run(tmp_path, [{"type": "test_over_budget"}, {"type": "evaluate"}])
    r = report(tmp_path)
    assert [s["type"] for s in r["stages"]] == ["test_over_budget"]
    assert r["stages"][0]["guard_violations"] == ["quantize.max_accuracy_drop: missed"]
    assert (tmp_path / "out" / "stages" / "01-test_over_budget" / "model" / "manifest.json").is_file()
    # the stage's on_violation decides for it: warn keeps its result and goes on
    out = run(tmp_path, [{"type": "test_over_budget", "on_violation": "warn"}, {"type": "evaluate"}])
    assert out["stages"][0]["on_violation"] == "warn" and len(out["stages"]) == 2
    assert out["final"].get("result_from_stage") is None and out["guard"]["violations"] == []


def test_final_revert_uses_the_last_good_snapshot(tmp_path, scramble):
    out = run(
        tmp_path,
        [{"type": "evaluate"}, {"type": "test_scramble"}],
        guard={"max_accuracy_drop": 1.0, "on_violation": "revert"},
    )
    assert out["final"]["result_from_stage"] == 1 and out["final"]["accuracy"] > 0.95


def test_size_and_speedup_guards(tmp_path):
    with pytest.raises(GuardError, match="guard.max_size_bytes: checkpoint"):
        run(tmp_path, [{"type": "evaluate"}], guard={"max_size_bytes": 100})
    d = tiny_recipe_dict(
        tmp_path, stages=[{"type": "evaluate"}], guard={"min_speedup": 1e6}
    )  # unreachable even when a loaded machine stalls the baseline timing
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(GuardError, match="guard.min_speedup"):
        compress_cli.run(p, force=True)


def test_time_budget_stops_cleanly_and_keeps_the_work(tmp_path):
    out = run(
        tmp_path, [{"type": "finetune", "epochs": 10000, "lr": 0.001}, {"type": "evaluate"}], time_budget_s=3
    )
    assert "time_budget_s" in out["stopped_early"]
    assert out["skipped"] == ["2. evaluate"]
    assert out["stages"][0]["details"]["stopped_early"] is True
    assert (tmp_path / "out" / "model" / "manifest.json").is_file()
    assert out["duration_s"] < 60
