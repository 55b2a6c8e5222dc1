"""A whole run with a non-classification task: ``task: regression`` on synthetic data from a
``package.module:callable`` data source (compress_cli.testing.regression_data) and a callable
model; the report carries the task's scores, its primary score and the drop from the baseline,
and ``guard.max_metric_drop`` fires on the primary metric (R², higher is better)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import compress_cli
from compress_cli.errors import GuardError
from compress_cli.testing import tiny_recipe_dict


def regression_recipe(tmp_path, stages, guard):
    d = tiny_recipe_dict(
        tmp_path,
        stages=stages,
        model={"source": "compress_cli.testing:tiny_regressor"},
        data={"source": "compress_cli.testing:regression_data", "batch_size": 64},
        task="regression",
        measure={"latency": None, "macs": False},
        guard=guard,
    )
    path = tmp_path / "regression.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def test_regression_run_reports_scores_and_guards_the_primary_metric(tmp_path):
    stages = [
        {"type": "prune", "sparsity": 0.1, "name": "light"},
        {"type": "prune", "sparsity": 0.9, "name": "heavy"},
    ]
    path = regression_recipe(tmp_path, stages, {"max_metric_drop": 0.05, "on_violation": "warn"})
    report = compress_cli.run(path)

    base = report["baseline"]
    assert (base["task"], base["primary"], base["higher_is_better"]) == ("regression", "r2", True)
    assert set(base["scores"]) == {"r2", "mse", "mae"} and base["score"] == base["scores"]["r2"]
    assert base.get("accuracy") is None and base["samples"] == 128
    # the targets are this very model's outputs plus 5 % noise: R² about 1 - 0.05²
    assert base["score"] > 0.99

    first, second = report["stages"]
    light, heavy = first["metrics"], second["metrics"]
    assert light["metric_drop"] == pytest.approx(base["score"] - light["score"], abs=1e-6)
    assert light["metric_drop"] < 0.05 and not first.get("guard_violations")
    assert heavy["metric_drop"] > 0.05
    assert heavy["scores"]["mse"] > light["scores"]["mse"] > base["scores"]["mse"]
    (violation,) = second["guard_violations"]
    assert violation == f"guard.max_metric_drop: r2 fell by {heavy['metric_drop']:.4g} (limit 0.05)"


def test_metric_drop_guard_fails_the_run(tmp_path):
    path = regression_recipe(tmp_path, [{"type": "prune", "sparsity": 0.9}], {"max_metric_drop": 0.05})
    with pytest.raises(GuardError, match=r"guard.max_metric_drop: r2 fell by"):
        compress_cli.run(path)


def test_shipped_custom_task_recipe_runs(tmp_path):
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "custom_task.yaml"
    report = compress_cli.run(
        recipe, overrides=["measure.latency=null", "device=cpu"], output=str(tmp_path / "out")
    )
    base, final = report["baseline"], report["final"]
    assert (base["task"], base["primary"]) == ("within_bins", "within")
    # the committed digits CNN: 99 % top-1; one class off counts too
    assert base["score"] >= base["scores"]["accuracy"] > 0.97
    assert final["metric_drop"] <= 0.02  # the recipe's guard held
