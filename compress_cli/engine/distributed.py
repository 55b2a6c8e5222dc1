"""The stage loop of a torchrun rank other than 0: the same stages, so that every collective
operation (DDP's gradient all-reduce, broadcasts) has its partner, but nothing written or measured."""

from __future__ import annotations

from typing import TYPE_CHECKING

from compress_cli.engine.stage_run import run_stage

if TYPE_CHECKING:
    from compress_cli.report import Report
    from compress_cli.state import State


def run_stages_secondary(state: State, report: Report) -> Report:
    """Run every stage of the recipe as rank 0 does (same seeds); returns ``report`` with the
    hparams found (the only thing a secondary rank reports)."""
    from compress_cli.stages.registry import get_stage

    for i, cfg in enumerate(state.recipe.stages, start=1):
        state.ctx.stage_dir = None
        run_stage(get_stage(cfg.type)(cfg, i), state, seed=state.recipe.seed + i)
    report.hparams = state.hparams
    return report
