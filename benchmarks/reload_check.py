"""Does a compressed model, reloaded from its directory, score what its report says?

For each run directory: read its recipe.yaml, build the recipe's data and task the way a run does,
load ``run/model`` with ``compress_cli.load()`` (rebuilt from the manifest, no pickles), evaluate it
on the report's split through the task, and compare every task metric with the report's final
metrics. Tasks that compare with the original model (fidelity, embedding) get the recipe's model
as loaded, as the run had.

Usage: ``python benchmarks/reload_check.py runs/NAME [runs/OTHER ...] [--trust-source]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def check(run: Path, trust_source: bool) -> dict[str, object]:
    """The report's final task metrics next to the reloaded model's, and the largest difference."""
    import torch

    import compress_cli
    from compress_cli.runtime.measure import evaluate
    from compress_cli.sources.data import build_data
    from compress_cli.sources.models import load_model
    from compress_cli.stages.registry import load_recipe
    from compress_cli.tasks import Reference, build_task

    recipe, _ = load_recipe(run / "recipe.yaml")
    report = json.loads((run / "report.json").read_text())
    final = report["final"]
    data = build_data(recipe.data, recipe.seed, recipe.model.input_shape, model_source=recipe.model.source)
    task = data.task = build_task(recipe.task, data.num_classes if data.labelled else None)
    if task.needs_reference:
        original, _ = load_model(recipe.model)
        task.reference = Reference(lambda: original.eval(), torch.device("cpu"), task)
    model = compress_cli.load(run / "model", trust_source=trust_source)
    if hasattr(model, "eval"):
        model.eval()
    from compress_cli._utils.batches import call

    got = evaluate(lambda x: call(model, x), data.loader(recipe.measure.split), task, split="reload")
    want = final.get("scores") or {k: final[k] for k in ("accuracy", "loss", "top5") if k in final}
    diffs = {k: abs(got[k] - v) for k, v in want.items() if k in got}
    return {
        "run": str(run),
        "task": task.name,
        "report": want,
        "reloaded": got,
        "max_diff": max(diffs.values()),
    }


def main() -> None:
    """Check every run directory given; print one line each."""
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--trust-source", action="store_true")
    args = ap.parse_args()
    for run in args.runs:
        r = check(run, args.trust_source)
        print(json.dumps(r))


if __name__ == "__main__":
    main()
