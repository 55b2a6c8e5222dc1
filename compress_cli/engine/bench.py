"""``compress bench RUN_DIR``: re-measure a finished run's speedup without re-running its recipe.

The original model is rebuilt from the recipe as run (``RUN_DIR/recipe.yaml``), the final one
loaded from ``RUN_DIR/model``; both are timed paired with the harness the run used
(:mod:`compress_cli.runtime.timing`), on this machine now, and report.json/md/png are updated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compress_cli.errors import SourceError, UsageError


def bench_run(run_dir: Path, *, write: bool = True, device: str | None = None) -> dict[str, Any]:
    """The paired speedup of ``run_dir``'s final model over its original, measured now in torch
    eager with the recipe's ``measure.latency`` (its defaults when latency was off), and the
    machine; with ``write`` the report's final metrics and machine facts are replaced by these."""
    from compress_cli.config.recipe import LatencyConfig
    from compress_cli.engine.setup import resolve_device
    from compress_cli.report import Report, write_report
    from compress_cli.runtime.machine import load_average, machine_facts
    from compress_cli.runtime.runners import EagerRunner
    from compress_cli.runtime.timing import paired_latency, speedup_fields
    from compress_cli.sources.data import build_data
    from compress_cli.sources.models import load_model, load_model_dir
    from compress_cli.stages.registry import load_recipe
    from compress_cli.tasks import build_task

    recipe_path, report_path = run_dir / "recipe.yaml", run_dir / "report.json"
    for p in (recipe_path, report_path, run_dir / "model"):
        if not p.exists():
            raise UsageError(
                f"{run_dir}: no {p.name}; compress bench takes the output directory of a finished run"
            )
    report = Report.model_validate(json.loads(report_path.read_text()))
    if report.final is None or report.incomplete:
        raise UsageError(
            f"{run_dir}: the run did not finish (report.json has no final result); nothing to bench"
        )
    recipe, _ = load_recipe(recipe_path, [f"device={device}"] if device else [])
    if write and report.final.runtime != "torch-eager":
        raise UsageError(
            f"{run_dir}: the run measured its final model in {report.final.runtime}; compress bench "
            "times torch eager only, so it will not overwrite those numbers; add --no-write to see them"
        )
    dev = resolve_device(recipe.device)
    cfg = recipe.measure.latency or LatencyConfig()
    data = build_data(recipe.data, recipe.seed, recipe.model.input_shape, model_source=recipe.model.source)
    data.task = build_task(recipe.task, data.num_classes if data.labelled else None)
    original, _ = load_model(recipe.model)
    try:
        final = load_model_dir(run_dir / "model", trust_source=recipe.model.trust_source)
    except SourceError as e:
        raise SourceError(f"{run_dir}/model: {e}") from e
    machine = machine_facts(dev, cfg.threads)
    pairs = paired_latency(
        EagerRunner(original.to(dev).eval(), dev),
        EagerRunner(final.to(dev).eval(), dev),
        data.example_input,
        cfg,
        recipe.seed,
    )
    machine["load_end"] = load_average()
    fields = speedup_fields(pairs)
    result = {"run": str(run_dir), "runtime": "torch-eager", **fields, "machine": machine}
    if write:
        for k, v in fields.items():
            setattr(report.final, k, v)
        report.machine = machine
        write_report(report, run_dir)
    return result
