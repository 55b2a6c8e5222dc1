"""Runs a recipe: load model and data, measure, run each stage, measure again, snapshot, guard,
and write the compressed model and the report. Stages never measure; this module does, the same
way for all of them. Nothing here prints: progress goes out through a :class:`RunListener`.

The collaborators: ``setup`` (device, seeds, output, State), ``stage_run`` (one stage),
``snapshots`` (resume and revert), ``guards`` (limits and what a violation does), ``signals``
(SIGINT/SIGTERM and the time budget) and ``distributed`` (the loop of the other torchrun ranks).
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress_cli.config.recipe import Recipe
from compress_cli.config.yaml import recipe_to_yaml
from compress_cli.engine.guards import GuardPolicy
from compress_cli.engine.lock import acquire
from compress_cli.engine.setup import (
    build_state,
    check_output,
    only_run_files,
    preflight,
    prepare_output,
    resolve_device,
)
from compress_cli.engine.signals import StopController
from compress_cli.engine.snapshots import SnapshotStore, stage_dump, stage_key
from compress_cli.engine.stage_run import run_stage
from compress_cli.errors import GuardError, Interrupted, StageError, UsageError
from compress_cli.events import RunListener
from compress_cli.report import Metrics, Report, StageEntry
from compress_cli.state import save_snapshot

if TYPE_CHECKING:
    import torch

    from compress_cli.stages.base import Stage, StageConfig, StageResult
    from compress_cli.state import State


def execute_recipe(
    recipe: Recipe,
    *,
    force: bool = False,
    device: str | None = None,
    listener: RunListener | None = None,
    resume: bool = False,
) -> Report:
    """Run every stage; write OUTPUT/{recipe.yaml, report.*, model/, stages/}. Returns the report.

    ``resume`` continues from the last complete stage snapshot of an earlier run of the same recipe.
    """
    if device:
        recipe = recipe.model_copy(update={"device": device})
    try:
        return Run(recipe, listener).execute(force=force, resume=resume)
    except OSError as e:  # disk full, permissions changed mid-run, ... where no _writing() said what
        raise output_error(recipe.output_dir(), e, Path(e.filename) if e.filename else None) from e


def output_error(out: Path, e: OSError, path: Path | None) -> StageError:
    """The one line for an OSError while writing ``path`` in ``out``: ``output OUT: No space left on
    device while writing stages/03-finetune`` (a snapshot is named by its folder)."""
    where = ""
    if path is not None:
        try:
            parts = path.relative_to(out).parts
        except ValueError:
            parts = ()
        if parts:
            where = " while writing " + "/".join(parts[:2] if parts[0] == "stages" else parts[:1])
        else:
            where = f" while writing {path}"
    return StageError(f"output {out}: {e.strerror or e}{where}")


def run_recipe(
    recipe: Recipe,
    *,
    force: bool = False,
    device: str | None = None,
    listener: RunListener | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """:func:`execute_recipe`, returning the report as written to report.json (a plain dict)."""
    report = execute_recipe(recipe, force=force, device=device, listener=listener, resume=resume)
    return report.to_dict()


class Run:
    """One execution of a recipe: the stage loop over a State, with its snapshots, guard and stop
    controller, and the report it fills in as it goes."""

    def __init__(self, recipe: Recipe, listener: RunListener | None = None):
        self.recipe = recipe
        self.listener = listener if listener is not None else RunListener()
        self.out = recipe.output_dir()
        self.snapshots = SnapshotStore(self.out / "stages", recipe)
        self.stop = StopController(recipe.time_budget_s, notify=self.listener.on_message)
        self.t0 = time.perf_counter()

    def execute(self, force: bool, resume: bool) -> Report:
        """Set up, measure the baseline (or restore the resume point), run the stages, finish."""
        from compress_cli.runtime import distributed

        recipe, out = self.recipe, self.out
        dev = distributed.setup(resolve_device(recipe.device))
        main = distributed.is_main()  # under torchrun only rank 0 writes files and measures
        if resume and distributed.world_size() > 1:
            raise UsageError("--resume is not supported under torchrun; resume with a single process")
        if not main:
            return self._run(dev, force, resume, main)
        if not out.exists():  # the refusals that need no lock, before anything is created
            check_output(out, force)
        lock = acquire(out, self.listener.on_message)  # before anything is read, checked or deleted
        try:
            return self._run(dev, force, resume, main)
        finally:
            lock.release()

    def _run(self, dev: torch.device, force: bool, resume: bool, main: bool) -> Report:
        from compress_cli._utils.io import atomic_write_text
        from compress_cli._version import __version__
        from compress_cli.engine.distributed import run_stages_secondary
        from compress_cli.runtime import distributed

        entries: list[StageEntry]
        baseline: Metrics | None
        recipe, out = self.recipe, self.out
        start, entries, baseline = 0, [], None  # what a resume point restores
        point = self.snapshots.resume_point() if resume else None
        # --resume before the first snapshot (killed in its first seconds) starts afresh: what the
        # killed run left is replaced without --force, anything else in the directory still needs it
        afresh = resume and point is None
        replace = force or (afresh and only_run_files(out))
        if point is not None:
            start, entries, baseline = point
        elif main:
            check_output(out, replace)
        self.listener.on_setup(recipe.name, str(dev), out)
        if afresh:
            self.listener.on_message(
                f"--resume: no snapshot in {self.snapshots.root} yet; starting from the beginning"
            )
            resume = False
        # bad model/data fail here, before anything is written
        state = build_state(recipe, dev, out, self.listener, self.stop)
        refused = preflight(state, skip=start)
        if refused:  # before any file is written or anything trains
            raise StageError(refused)
        report = Report(
            recipe=recipe.name,
            tool_version=__version__,
            device=str(dev),
            seed=recipe.seed,
            output=str(out),
            stages=[],
        )
        if main:
            from compress_cli.runtime.machine import machine_facts

            lat = recipe.measure.latency
            report.machine = machine_facts(dev, lat.threads if lat is not None else None)
        if not main:
            distributed.barrier()
            return run_stages_secondary(state, report)
        with self.stop.handling_signals():
            if resume:
                report.resumed_after_stage = start
                report.stages = entries
                if start:
                    self.snapshots.restore(state, self.snapshots.stage_dir(start))
                self.listener.on_message(f"resuming after stage {start} of {len(recipe.stages)}")
            else:
                prepare_output(out, replace)
                with self._writing(out / "recipe.yaml"):
                    atomic_write_text(out / "recipe.yaml", recipe_to_yaml(recipe))
            distributed.barrier()
            if baseline is None:
                baseline = self._measure_baseline(state)
            report.baseline = baseline
            self.listener.on_baseline(baseline)
            return self._stages(state, report, start)

    @contextlib.contextmanager
    def _writing(self, path: Path) -> Iterator[None]:
        """An OSError in the block (disk full, ...) becomes the one located line of
        :func:`output_error`. Snapshots are written file by file atomically, their state.json last,
        so a failed write of snapshot N leaves N-1 the resume point."""
        try:
            yield
        except OSError as e:
            raise output_error(self.out, e, path) from e

    # -- measuring ---------------------------------------------------------------------------
    def _measure(self, state: State, model_dir: Path, reference: Metrics | None) -> Metrics:
        from compress_cli.runtime.measure import measure_all

        cfg = self.recipe.measure
        self.listener.on_measure_start(len(state.data.loader(cfg.split).dataset))  # type: ignore[arg-type]
        metrics = measure_all(
            state.current_runner(),
            state.model,
            state.data,
            state.device,
            cfg,
            model_dir=model_dir,
            reference=reference,
            on_batch=self.listener.on_eval_step,
        )
        if reference is not None and cfg.latency is not None and metrics.latency_ms:
            self._pair(state, metrics, reference)
        self.listener.on_measure_end(metrics)
        if not metrics.size_bytes:  # it was just saved: someone else deleted or emptied the directory
            raise StageError(
                f"output {self.out}: the checkpoint just saved in {model_dir} is gone; "
                "did another process delete the output directory?"
            )
        return metrics

    def _pair(self, state: State, metrics: Metrics, reference: Metrics) -> None:
        """Replace the speedup (taken from two measurements minutes apart) by the paired one: the
        original model and the current runner timed alternately now (runtime.timing); the unpaired
        ratio stays as ``speedup_unpaired``."""
        from compress_cli.runtime.runners import EagerRunner
        from compress_cli.runtime.timing import paired_latency, speedup_fields

        cfg = self.recipe.measure.latency
        assert cfg is not None and metrics.latency_ms and reference.latency_ms
        metrics.speedup_unpaired = reference.latency_ms / metrics.latency_ms
        original = EagerRunner(state.original_model(), state.device)
        pairs = paired_latency(
            original, state.current_runner(), state.data.example_input, cfg, self.recipe.seed
        )
        for k, v in speedup_fields(pairs).items():
            setattr(metrics, k, v)

    def _measure_baseline(self, state: State) -> Metrics:
        from compress_cli.engine.guards import violations
        from compress_cli.runtime.measure import fp32_state_dict_bytes

        d = self.snapshots.baseline_dir
        with self._writing(d):
            save_snapshot(state, d / "model")
        baseline = self._measure(state, d / "model", None)
        assert baseline.size_bytes  # _measure refuses a checkpoint of 0 bytes
        baseline.fp32_bytes = fp32_state_dict_bytes(state.original_model())
        baseline.size_ratio = baseline.fp32_bytes / baseline.size_bytes
        baseline.guard_violations = violations(self.recipe.guard, baseline, baseline)
        with self._writing(d):
            self.snapshots.write(d, state, baseline=baseline.to_dict(), stage=None)
        return baseline

    # -- the stage loop ----------------------------------------------------------------------
    def _stages(self, state: State, report: Report, start: int) -> Report:
        from compress_cli.stages.registry import get_stage

        recipe = self.recipe
        assert report.baseline is not None
        guard = GuardPolicy(recipe.guard, report.baseline, self.snapshots, report.stages)
        last_metrics = report.stages[-1].metrics if report.stages else report.baseline
        for i, cfg in enumerate(recipe.stages, start=1):
            if i <= start:
                continue
            if self.stop.should_stop():
                report.skipped = [f"{j}. {c.type}" for j, c in enumerate(recipe.stages, start=1) if j >= i]
                break
            stage = get_stage(cfg.type)(cfg, i)
            sdir = self.snapshots.stage_dir(i)
            state.ctx.stage_dir, state.ctx.stage_key = sdir, stage_key(recipe, i)
            self.listener.on_stage_start(i, len(recipe.stages), stage.name, cfg.type)
            ts = time.perf_counter()
            failed = partial(self._stage_failed, report, last_metrics, f"stage {i} ({cfg.type}) failed")
            result: StageResult | None = None
            try:  # a resumed run draws the same numbers: the seed depends on the stage's index only
                result = run_stage(stage, state, seed=recipe.seed + i, on_error=failed)
            except KeyboardInterrupt:
                self.stop.interrupted(signal.SIGINT)
            if self.stop.signal is not None:
                self._interrupted(state, report, last_metrics, i, cfg, sdir)
            assert result is not None
            entry = self._finish_stage(state, stage, result, sdir, time.perf_counter() - ts, guard)
            report.stages.append(entry)
            self.listener.on_stage_end(entry)
            if entry.guard_violations:
                action = guard.stage_action(cfg)
                if result.violations and cfg.on_violation is None:  # the stage's own limit: as a guard
                    action = guard.final_action
                entry.on_violation = action
                if action == "fail":
                    return self._fail(state, report, guard, entry.guard_violations)
                if action == "revert":
                    entry.rejected_metrics = entry.metrics
                    entry.metrics = last_metrics  # the model is the previous stage's again
                    self._revert(state, sdir, guard.last_good[1], entry)
                    guard.passed(i, sdir)
                    continue
            else:
                guard.passed(i, sdir)
            last_metrics = entry.metrics
        if self.stop.reason and report.skipped is not None:
            report.stopped_early = self.stop.reason
        violations = guard.check(last_metrics)
        if violations and guard.final_action != "warn":
            if guard.final_action == "fail":
                return self._fail(state, report, guard, violations)
            report.reverted_to = guard.last_good[0]
        keep_last_good = bool(violations) and guard.final_action == "revert"
        return self._finalise(state, report, violations, guard if keep_last_good else None)

    def _finish_stage(
        self,
        state: State,
        stage: Stage[Any],
        result: StageResult,
        sdir: Path,
        duration: float,
        guard: GuardPolicy,
    ) -> StageEntry:
        with self._writing(sdir):
            save_snapshot(state, sdir / "model")
        metrics = self._measure(state, sdir / "model", guard.baseline)
        entry = StageEntry(
            index=stage.index,
            name=stage.name,
            type=stage.type_name,
            duration_s=round(duration, 3),
            metrics=metrics,
            notes=result.notes,
            details=result.details,
            artifacts=result.artifacts,
        )
        v = [*result.violations, *guard.check(metrics)]
        if v:
            entry.guard_violations = v
        with self._writing(sdir):
            self.snapshots.write(sdir, state, entry=entry.to_dict(), stage=stage_dump(stage.config))
        return entry

    def _interrupted(
        self, state: State, report: Report, last: Metrics, i: int, cfg: StageConfig, sdir: Path
    ) -> None:
        """A signal arrived during stage ``i``: keep its partial model, write the partial report, exit."""
        assert self.stop.signal is not None
        kept = ""
        with contextlib.suppress(Exception):
            save_snapshot(state, sdir / "interrupted" / "model")
            kept = f"; its partial model is in {sdir / 'interrupted' / 'model'}"
        done = {1: "no stage had finished", 2: "stage 1 is kept"}.get(i, f"stages 1..{i - 1} are kept")
        msg = (
            f"interrupted by {signal.Signals(self.stop.signal).name} during stage {i} ({cfg.type}); "
            f"{done} (snapshots in {self.snapshots.root}){kept}"
        )
        self.write_partial(report, last, msg)
        raise Interrupted(msg)

    def _revert(self, state: State, sdir: Path, previous: Path, entry: StageEntry) -> None:
        """Keep the rejected model for inspection, go back to ``previous``, re-snapshot as this stage."""
        import shutil

        rejected = sdir / "rejected"
        if rejected.exists():
            shutil.rmtree(rejected)
        shutil.move(str(sdir / "model"), str(rejected))
        self.snapshots.restore(state, previous)
        with self._writing(sdir):
            save_snapshot(state, sdir / "model")
        entry.reverted = True
        entry.notes = (entry.notes or "") + f" — reverted (guard violated; rejected model in {rejected})"
        config = self.recipe.stages[entry.index - 1]
        with self._writing(sdir):
            self.snapshots.write(sdir, state, entry=entry.to_dict(), stage=stage_dump(config))

    def _fail(self, state: State, report: Report, guard: GuardPolicy, violations: list[str]) -> Report:
        self._finalise(state, report, violations, guard)
        kept = guard.kept_phrase()
        raise GuardError(
            [*violations, f"kept the last result that satisfies every guard ({kept}) in {self.out / 'model'}"]
        )

    def _finalise(
        self, state: State, report: Report, violations: list[str], fallback: GuardPolicy | None
    ) -> Report:
        """Write the final model (the current one, or ``fallback``'s last good result) and the report."""
        from compress_cli.report import write_report

        assert report.baseline is not None
        final_dir = self.out / "model"
        if fallback is not None:  # the result is the last snapshot that satisfied the guards
            with self._writing(final_dir):
                idx = fallback.install_last_good(final_dir)
            source = report.baseline if idx == 0 else next(e.metrics for e in report.stages if e.index == idx)
            final = source.model_copy()
            final.result_from_stage = idx
        else:
            with self._writing(final_dir):
                save_snapshot(state, final_dir)
            final = (report.stages[-1].metrics if report.stages else report.baseline).model_copy()
            same = getattr(state.runner, "same_runtime_baseline", None)
            if callable(same):
                final.same_runtime_baseline = same(state)
        report.final = final
        report.hparams = state.hparams
        report.edits = state.edits.to_json()
        report.guard = {"violations": violations, **self.recipe.guard.model_dump()}
        report.duration_s = round(time.perf_counter() - self.t0, 3)
        if report.machine is not None:
            from compress_cli.runtime.machine import load_average

            report.machine["load_end"] = load_average()
        with self._writing(self.out / "report.json"):
            write_report(report, self.out)
        self.listener.on_done(report)
        return report

    def _stage_failed(self, report: Report, last: Metrics, what: str, error: Exception) -> None:
        self.write_partial(report, last, f"{what}: {error}")

    def write_partial(self, report: Report, last: Metrics, error: str) -> None:
        """report.* of a run that stopped at a failure: what was measured so far, marked incomplete."""
        from compress_cli.report import write_report

        if report.baseline is None:
            return
        partial = report.model_copy(update={"final": last, "error": error, "incomplete": True})
        with contextlib.suppress(Exception):
            write_report(partial, self.out)
