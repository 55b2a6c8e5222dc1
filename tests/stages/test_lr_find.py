"""lr_find: the curve analysis on synthetic curves, the stage on the digits MLP (restores the
model, writes hparams.lr and the PNG), and the `lr: auto` validation rule."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from compress_cli.config.recipe import Recipe
from compress_cli.config.yaml import parse_yaml
from compress_cli.errors import RecipeError
from compress_cli.stages.registry import get_stage, validate
from compress_cli.tuning import lr_schedule, smooth, suggest_lr


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add contention on a shared 2-core box
    yield
    torch.set_num_threads(n)


def make_state(tmp_path: Path, model: str = "zoo:digits_mlp", **data):
    from compress_cli.engine.setup import build_state

    recipe = Recipe.model_validate(
        {
            "name": "t",
            "device": "cpu",
            "model": {"source": model},
            "data": {"source": "digits", **data},
            "output": str(tmp_path / "out"),
        }
    )
    out = tmp_path / "out"
    out.mkdir(parents=True, exist_ok=True)
    return build_state(recipe, torch.device("cpu"), out)


def run_stage(state, index: int = 1, **cfg):
    cls = get_stage("lr_find")
    return cls(cls.config_class.model_validate({"type": "lr_find", **cfg}), index).run(state)


def recipe_text(stages: list[dict]) -> str:
    return yaml.safe_dump(
        {"version": 1, "name": "t", "device": "cpu", "model": {"source": "zoo:digits_mlp"}, "stages": stages},
        sort_keys=False,
    )


# ------------------------------------------------------------------ curve analysis
def test_schedule_endpoints_and_shape():
    exp = lr_schedule(1e-5, 1.0, 11, "exponential")
    assert exp[0] == pytest.approx(1e-5) and exp[-1] == pytest.approx(1.0)
    ratios = [b / a for a, b in zip(exp, exp[1:], strict=False)]
    assert max(ratios) == pytest.approx(min(ratios))  # constant ratio
    lin = lr_schedule(0.0 + 1e-3, 1.0, 5, "linear")
    assert np.allclose(np.diff(lin), (1.0 - 1e-3) / 4)


def test_smooth_is_bias_corrected_ema():
    assert smooth([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])  # no warm-up bias towards 0
    assert smooth([1.0, 3.0], 0.0) == [1.0, 3.0]


def _u_curve(n: int = 100, noise: float = 0.0, seed: int = 0):
    lrs = lr_schedule(1e-5, 1.0, n)
    x = np.log10(lrs)
    # sigmoid descent centred at lr 1e-2.5, then a blow-up after 1e-1
    loss = 2.3 - 2.0 / (1 + np.exp(-3 * (x + 2.5))) + np.where(x > -1, 8 * (x + 1) ** 2, 0)
    loss = loss + np.random.default_rng(seed).normal(0, noise, n)
    return lrs, list(loss)


def test_steepest_descent_on_a_clean_curve():
    lrs, losses = _u_curve()
    s = smooth(losses, 0.0)
    sug = suggest_lr(lrs, losses, s, skip_start=5)
    assert sug.lr is not None, sug.reason
    assert 10**-2.9 < sug.lr < 10**-2.1  # the sigmoid's steepest point is at 10^-2.5


def test_min_div_suggestion():
    lrs, losses = _u_curve()
    sug = suggest_lr(lrs, losses, smooth(losses, 0.0), method="min_div", factor=10)
    i_min = int(np.argmin(losses))
    assert sug.lr == pytest.approx(lrs[i_min] / 10)


def test_flat_curve_gives_no_suggestion():
    lrs = lr_schedule(1e-6, 1e-4, 100)
    losses = list(0.05 + np.random.default_rng(0).normal(0, 1e-4, 100))
    sug = suggest_lr(lrs, losses, smooth(losses, 0.9))
    assert sug.lr is None and "flat" in sug.reason


def test_noisy_curve_gives_no_suggestion():
    lrs = lr_schedule(1e-5, 1e-1, 100)
    trend = np.linspace(1.0, 0.85, 100)
    losses = list(trend + np.random.default_rng(0).normal(0, 0.4, 100))
    sug = suggest_lr(lrs, losses, smooth(losses, 0.98), min_improvement=0.01)
    assert sug.lr is None and "noisy" in sug.reason


def test_too_short_curve_gives_no_suggestion():
    lrs, losses = _u_curve(n=8)
    sug = suggest_lr(lrs, losses, smooth(losses, 0.5))
    assert sug.lr is None and "point" in sug.reason


# ------------------------------------------------------------------ the stage
def test_stage_restores_model_and_rng_and_writes_lr(tmp_path):
    state = make_state(tmp_path)
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    res = run_stage(state, steps=40, min_lr=1e-4, max_lr=1.0, skip_start=3)
    after = state.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and buffers put back
    assert all(p.grad is None for p in state.model.parameters())
    assert torch.equal(torch.rand(3), expected_next)  # the sweep did not consume the caller's RNG
    d = res.details
    assert d["reliable"] is True, d["reason"]
    assert state.hparams["lr"] == d["suggested_lr"] and 1e-4 <= d["lr"] <= 1.0
    assert res.artifacts == ["lr_find-01.png"]
    png = tmp_path / "out" / "lr_find-01.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(d["curve"]["lr"]) == d["steps_run"] <= 40
    assert "lr" in res.notes


def test_stage_stops_on_divergence(tmp_path):
    state = make_state(tmp_path)
    res = run_stage(state, steps=200, min_lr=1e-3, max_lr=1e4, optimizer="sgd", skip_start=2)
    assert res.details["stop"] == "diverged"
    assert res.details["steps_run"] < 200
    assert all(v is None or math.isfinite(v) for v in res.details["curve"]["loss"])  # JSON-safe


def test_flat_sweep_keeps_fallback_then_earlier_lr(tmp_path):
    state = make_state(tmp_path)
    # an lr range far too small to move the loss: a flat curve
    res = run_stage(state, steps=30, min_lr=1e-9, max_lr=1e-8, fallback_lr=0.02, skip_start=2)
    assert res.details["reliable"] is False and "flat" in res.details["reason"]
    assert state.hparams["lr"] == 0.02 and res.details["lr_source"] == "fallback_lr"
    assert "no reliable suggestion" in res.notes
    state.hparams["lr"] = 0.005  # found by an earlier stage: kept instead of the fallback
    res = run_stage(state, index=2, steps=30, min_lr=1e-9, max_lr=1e-8, fallback_lr=0.02, skip_start=2)
    assert state.hparams["lr"] == 0.005 and res.details["lr_source"] == "earlier stage"


# ------------------------------------------------------------------ validation
def test_lr_auto_needs_lr_find_first():
    ok = recipe_text([{"type": "lr_find"}, {"type": "finetune", "lr": "auto"}])
    assert validate(parse_yaml(ok, "r.yaml")).stages[1].lr == "auto"
    bad = recipe_text([{"type": "finetune", "lr": "auto"}, {"type": "lr_find"}])
    with pytest.raises(RecipeError, match=r"r.yaml:\d+: stages\[0\] \(finetune\).lr: 'auto' needs lr_find"):
        validate(parse_yaml(bad, "r.yaml"))


def test_config_rules_are_located():
    bad = recipe_text([{"type": "lr_find", "min_lr": 0.1, "max_lr": 0.01}])
    with pytest.raises(
        RecipeError, match=r"r.yaml:\d+: stages\[0\] \(lr_find\).*max_lr must be greater than min_lr"
    ):
        validate(parse_yaml(bad, "r.yaml"))
    bad = recipe_text([{"type": "lr_find", "steps": 2}])
    with pytest.raises(
        RecipeError, match=r"stages\[0\] \(lr_find\).steps: must be greater than or equal to 5"
    ):
        validate(parse_yaml(bad, "r.yaml"))
