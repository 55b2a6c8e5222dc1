"""The search behind the ``hpo`` stage: Optuna study, trials over copies of the state, best trial kept.

How a search ends and what counts:

- ``n_trials`` is the number of trials in the *study*, whatever their state and whichever worker or
  run made them. Before each new trial a worker counts the study's trials (running ones included);
  a trial that another worker's concurrent start pushed past the limit is closed at once as pruned
  with the user attribute ``overflow`` and never runs (it is left out of the trial table).
- A trial runs the wrapped stages through the run's stage runner (``state.ctx.run_stage``: what the
  pipeline does for each stage, errors located as ``stages[i] (type)``) and is scored by the
  pipeline's measurement (``measure_all``) on the validation split.
- A wrapped stage's error marks its trial FAIL (the message is kept as user attribute ``error``) and
  the search goes on; KeyboardInterrupt marks the running trial FAIL before it propagates. Outside a
  pipeline SIGINT/SIGTERM raise it (unless someone else handles the signal); inside one the run's
  stop controller asks the trial to stop, which fails it the same way. With a database storage a
  heartbeat lets later workers mark trials of a killed worker failed.
- The best trial (single objective) or the Pareto trial with the best first objective is applied.
  Its model is kept in memory when it ran in this process; otherwise (another worker, an earlier
  run) its parameters are run again here with the same trial seed.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import tempfile
import time
import uuid
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from compress_cli.errors import CompressError, StageError
from compress_cli.hpo.space import (
    SCORE,
    Distribution,
    Objective,
    objective_direction,
    resolve_space_key,
    sample_param,
    with_params,
)
from compress_cli.hpo.storage import make_pruner, make_sampler, open_storage, redact, storage_url
from compress_cli.hpo.table import format_value, trial_row
from compress_cli.hpo.trial import PrunerReport, isolated_rng, trial_state

if TYPE_CHECKING:
    from compress_cli.stages.base import Stage, StageConfig
    from compress_cli.state import State


class SearchSettings(Protocol):
    """What a search reads of its configuration (the ``hpo`` stage's config provides it)."""

    @property
    def stages(self) -> list[StageConfig]:
        """The wrapped stage configs each trial runs."""
        ...

    @property
    def space(self) -> dict[str, Distribution]:
        """``STAGE.param`` -> the distribution its values are sampled from."""
        ...

    @property
    def n_trials(self) -> int | None:
        """Trials in the study in total (all workers and resumes); None: only the timeout ends it."""
        ...

    @property
    def timeout_s(self) -> float | None:
        """Seconds after which no new trial starts (None: no limit)."""
        ...

    @property
    def objectives(self) -> list[Objective]:
        """What the trials are scored on (more than one: a Pareto front)."""
        ...

    @property
    def directions(self) -> Mapping[str, str]:
        """Objective -> ``maximize``/``minimize`` where the user gave one (else the task's)."""
        ...

    @property
    def sampler(self) -> str:
        """How trials pick parameters: ``tpe``, ``random`` or ``cmaes``."""
        ...

    @property
    def sampler_startup_trials(self) -> int:
        """Random trials before a tpe/cmaes sampler starts modelling."""
        ...

    @property
    def pruner(self) -> str:
        """What stops lagging trials: ``median``, ``hyperband`` or ``none``."""
        ...

    @property
    def pruner_startup_trials(self) -> int:
        """Trials the median pruner never prunes."""
        ...

    @property
    def pruner_warmup_epochs(self) -> int:
        """Epochs of each trial the median pruner never prunes."""
        ...

    @property
    def enqueue_defaults(self) -> bool:
        """Whether the first trial of a new study runs the wrapped stages' configured values."""
        ...

    @property
    def storage(self) -> str | None:
        """SQLAlchemy URL of the study, ``memory``, or None (a SQLite file in the output directory)."""
        ...

    @property
    def study_name(self) -> str | None:
        """The study to create or join (None: named after the recipe and the hpo stage)."""
        ...

    @property
    def heartbeat_s(self) -> int | None:
        """Database storages: seconds between heartbeats (a worker silent 3x as long: its trials fail)."""
        ...


#: builds the stage that runs a wrapped config at a 1-based position (the stage registry's job)
StageFactory = Callable[["StageConfig", int], "Stage[Any]"]


@dataclass
class Outcome:
    """What a finished trial leaves: its state (model, edits, ...) and objective values."""

    state: State
    values: list[float]


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Stages never print: Optuna's per-trial log lines and experimental warnings are muted."""
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            yield
        finally:
            optuna.logging.set_verbosity(level)


class Search:
    """One ``hpo`` stage run: the objective, the kept outcomes, the final choice.

    ``index``/``name``: the hpo stage's position (1-based) and label; ``build_stage`` makes the
    stage for a wrapped config."""

    def __init__(self, cfg: SearchSettings, index: int, name: str, state: State, build_stage: StageFactory):
        self.cfg = cfg
        self.index = index
        self.name = name
        self.state = state
        self.build_stage = build_stage
        task = state.data.get_task()
        self.directions = [
            objective_direction(
                o,
                str(task.primary),
                bool(task.higher_is_better),
                getattr(task, "direction", _default_direction),
                dict(getattr(cfg, "directions", {}) or {}),
            )
            for o in cfg.objectives
        ]
        self.paths = {k: resolve_space_key(cfg.stages, k) for k in cfg.space}
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"  # this search
        self.kept: dict[int, Outcome] = {}
        self.study: Any = None

    # ------------------------------------------------------------------ one trial
    def run_trial(self, trial: Any, *, rerun: bool = False) -> list[float]:
        """Optuna's objective: sample, run the wrapped stages on a copy, measure, keep."""
        import optuna

        cfg = self.cfg
        if not rerun:
            if cfg.n_trials is not None and trial.number >= cfg.n_trials:
                trial.set_user_attr("overflow", True)  # a concurrent worker filled the study first
                self.study.stop()
                raise optuna.TrialPruned("overflow: the study already has n_trials trials")
            trial.set_user_attr("worker", self.worker)
        params = {key: sample_param(trial, key, dist) for key, dist in cfg.space.items()}
        by_stage: dict[int, dict[str, Any]] = {}
        for key, (index, path) in self.paths.items():
            by_stage.setdefault(index, {})[path] = params[key]
        try:
            configs = [with_params(c, by_stage[i]) if i in by_stage else c for i, c in enumerate(cfg.stages)]
        except Exception as e:  # a combination the wrapped stage refuses
            return self._fail(trial, f"parameters {params} rejected: {str(e).splitlines()[0]}")
        folder = self.state.ctx.output_dir / f"hpo-{self.index:02d}-trials" / f"trial-{trial.number:03d}"
        sub = trial_state(self.state, folder, trial.number)
        pruner = PrunerReport(trial, single=len(cfg.objectives) == 1, metric=_epoch_key(cfg.objectives[0]))
        sub.ctx.epoch_callbacks = [pruner]
        t0 = time.perf_counter()
        try:
            with isolated_rng(self.trial_seed(trial.number)):
                for i, c in enumerate(configs, start=1):
                    sub.ctx.run_stage(self.build_stage(c, i), sub)
                    if self.state.ctx.should_stop():
                        raise StageError("interrupted (the run was asked to stop)")
                values = self.objective_values(sub)
        except Exception as e:
            if pruner.pruned is not None:  # however a wrapped stage passed the pruning on
                trial.set_user_attr("epochs", pruner.epochs)
                raise optuna.TrialPruned(pruner.pruned) from None
            if isinstance(e, CompressError):
                return self._fail(trial, "; ".join(e.problems))
            return self._fail(trial, f"{type(e).__name__}: {e}")
        trial.set_user_attr("epochs", pruner.epochs)
        trial.set_user_attr("seconds", round(time.perf_counter() - t0, 3))
        if not all(math.isfinite(v) for v in values):
            return self._fail(trial, f"objective is not finite: {values}")
        self.keep(trial.number, Outcome(sub, values))
        scores = ", ".join(f"{o} {v:.4g}" for o, v in zip(cfg.objectives, values, strict=True))
        self.state.ctx.listener.on_message(f"{self.name}: trial {trial.number} {scores}")
        return values

    def _fail(self, trial: Any, message: str) -> Any:
        trial.set_user_attr("error", message[:500])
        self.state.ctx.listener.on_message(f"{self.name}: trial {trial.number} failed: {message[:200]}")
        raise StageError(message)

    def trial_seed(self, number: int) -> int:
        """The seed trial ``number`` draws from (the same in every worker and on a re-run)."""
        return (self.state.seed + 1) * 1_000_003 + number

    def objective_values(self, sub: State) -> list[float]:
        """The trial's objectives, measured by the pipeline's ``measure_all`` on the validation
        split: latency at the recipe's first batch size, size as the saved checkpoint's bytes."""
        from compress_cli.config.recipe import LatencyConfig, MeasureConfig
        from compress_cli.runtime.measure import measure_all
        from compress_cli.state import save_snapshot

        wanted = set(self.cfg.objectives)
        latency = None
        if "latency_ms" in wanted:
            lat = sub.recipe.measure.latency or LatencyConfig.model_validate({})
            latency = lat.model_copy(update={"batch_sizes": [lat.batch_sizes[0]]})
        cfg = MeasureConfig(split="val", latency=latency, macs="macs" in wanted)
        with tempfile.TemporaryDirectory(prefix="compress-hpo-") as d:
            model_dir = Path(d) / "model" if "size_bytes" in wanted else None
            if model_dir is not None:
                save_snapshot(sub, model_dir)
            m = measure_all(sub.current_runner(), sub.model, sub.data, sub.device, cfg, model_dir=model_dir)
        values = [objective_value(m, o) for o in self.cfg.objectives]
        return [math.nan if v is None else float(v) for v in values]

    def keep(self, number: int, outcome: Outcome) -> None:
        """Hold the best outcome (single objective) or the local Pareto set (several)."""
        self.kept[number] = outcome
        if len(self.directions) == 1:
            sign = 1 if self.directions[0] == "maximize" else -1
            best = max(self.kept, key=lambda n: (sign * self.kept[n].values[0], -n))
            self.kept = {best: self.kept[best]}
        else:
            keep = {
                n: o
                for n, o in self.kept.items()
                if not any(self._dominates(p.values, o.values) for m, p in self.kept.items() if m != n)
            }
            self.kept = keep

    def _dominates(self, a: list[float], b: list[float]) -> bool:
        better = [
            (x >= y) if d == "maximize" else (x <= y) for x, y, d in zip(a, b, self.directions, strict=True)
        ]
        strictly = [
            (x > y) if d == "maximize" else (x < y) for x, y, d in zip(a, b, self.directions, strict=True)
        ]
        return all(better) and any(strictly)

    def defaults(self) -> dict[str, Any]:
        """The wrapped stages' configured values of the space's parameters that the space contains."""
        out = {}
        for key, (index, path) in self.paths.items():
            node: Any = self.cfg.stages[index].model_dump(mode="python")
            for part in path.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is not None and self.cfg.space[key].contains(node):
                out[key] = node
        return out

    # ------------------------------------------------------------------ the study
    def study_count(self) -> int:
        """Trials in the study, whatever their state (overflow trials left out)."""
        return sum(1 for t in self.study.get_trials(deepcopy=False) if not t.user_attrs.get("overflow"))

    def run(self) -> tuple[str, dict[str, Any]]:
        """Open (or join) the study, run trials until it has ``n_trials`` or time is up, finish:
        the best trial's model, edits, transforms and hparams end up in the state; returns the
        stage's (notes, details)."""
        import optuna

        from compress_cli.runtime import distributed

        cfg, state = self.cfg, self.state
        if distributed.active():
            raise StageError(
                "hpo runs its trials in one process; under torchrun start separate `compress run` "
                'workers that share a storage instead (see the README, "Several workers on one study")'
            )
        url = storage_url(cfg.storage, state.ctx.output_dir, self.index)
        shared = cfg.storage not in (None, "memory")
        study_name = cfg.study_name or f"{state.recipe.name or 'compress'}-{self.name}-{self.index}"
        with quiet_optuna():
            storage = open_storage(url, cfg.heartbeat_s)
            try:
                probe = optuna.load_study(study_name=study_name, storage=storage)
                existing = len(probe.trials)
            except KeyError:
                existing = 0
            # a fresh run is reproducible; a resumed one does not replay the draws of the first; workers
            # sharing a study draw apart from each other (their order is not reproducible anyway)
            seed = state.seed * 7919 + existing
            if shared:
                seed = zlib.crc32(f"{seed}:{self.worker}".encode())
            try:
                self.study = optuna.create_study(
                    storage=storage,
                    study_name=study_name,
                    directions=self.directions,  # type: ignore[arg-type]
                    sampler=make_sampler(cfg.sampler, seed, cfg.sampler_startup_trials, shared),
                    pruner=make_pruner(cfg.pruner, cfg.pruner_startup_trials, cfg.pruner_warmup_epochs),
                    load_if_exists=True,
                )
            except ValueError as e:
                raise StageError(f"study {study_name!r} in {redact(url)}: {e}") from None
            if list(self.study.directions) != [
                optuna.study.StudyDirection[d.upper()] for d in self.directions
            ]:
                raise StageError(
                    f"study {study_name!r} in {redact(url)} was created with other objectives; "
                    "use another study_name"
                )

            if cfg.enqueue_defaults and not self.study.get_trials(deepcopy=False):
                defaults = self.defaults()
                if defaults:
                    self.study.enqueue_trial(defaults, user_attrs={"defaults": True}, skip_if_exists=True)

            def stop_when_done(study: Any, trial: Any) -> None:
                if state.ctx.should_stop() or (
                    cfg.n_trials is not None and self.study_count() >= cfg.n_trials
                ):
                    study.stop()

            t0 = time.perf_counter()
            ran_before = self.study_count()
            if cfg.n_trials is None or ran_before < cfg.n_trials:
                # outside a pipeline a signal interrupts at once (Optuna marks the running trial failed);
                # inside one this is a no-op and the pipeline's graceful stop is in charge
                with state.ctx.stop.handling_signals(interrupt=True):
                    self.study.optimize(
                        self.run_trial,
                        timeout=cfg.timeout_s,
                        callbacks=[stop_when_done],
                        catch=(StageError,),
                        gc_after_trial=False,
                        show_progress_bar=False,
                    )
            return self.finish(study_name, url, time.perf_counter() - t0, ran_before)

    def finish(
        self, study_name: str, url: str | None, seconds: float, ran_before: int
    ) -> tuple[str, dict[str, Any]]:
        """Apply the best trial's outcome to the state; -> (notes, details) for the stage result."""
        import optuna

        cfg, state = self.cfg, self.state
        TS = optuna.trial.TrialState
        trials = [t for t in self.study.get_trials(deepcopy=False) if not t.user_attrs.get("overflow")]
        counts = {
            name.lower(): sum(1 for t in trials if t.state == getattr(TS, name))
            for name in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")
        }
        complete = [t for t in trials if t.state == TS.COMPLETE]
        if not complete:
            errors = sorted({str(t.user_attrs.get("error", "")) for t in trials if t.state == TS.FAIL} - {""})
            raise StageError(
                f"no trial completed ({counts['pruned']} pruned, {counts['fail']} failed)"
                + (f"; errors: {' | '.join(errors[:3])}" if errors else "")
            )
        if len(self.directions) == 1:
            best = self.study.best_trial
            front = [best]
        else:
            front = sorted(self.study.best_trials, key=lambda t: t.number)
            sign = 1 if self.directions[0] == "maximize" else -1
            best = max(front, key=lambda t: (sign * t.values[0], -t.number))
        outcome = self.kept.get(best.number)
        rerun = outcome is None
        if rerun:  # ran in another worker or an earlier run: run its parameters again here
            state.ctx.listener.on_message(
                f"{self.name}: best trial {best.number} ran elsewhere; running its parameters here"
            )
            fixed = optuna.trial.FixedTrial(best.params, number=best.number)
            try:
                self.run_trial(fixed, rerun=True)
            except (StageError, optuna.TrialPruned) as e:
                raise StageError(
                    f"re-running the best trial {best.number} ({best.params}) failed: {e}"
                ) from None
            outcome = self.kept[best.number]
        assert outcome is not None
        sub = outcome.state
        state.model = sub.model
        state.model_spec = sub.model_spec
        state.edits = sub.edits
        state.transforms = sub.transforms
        state.runner = sub.runner
        state.hparams.update(sub.hparams)
        state.edits.record(self.name, op="hpo", best_trial=best.number, params=dict(best.params))
        table = [trial_row(t, self.worker) for t in trials]
        obj = ", ".join(f"{o} {v:.4g}" for o, v in zip(cfg.objectives, best.values, strict=True))
        notes = (
            f"{len(trials)} trials ({counts['complete']} complete, {counts['pruned']} pruned, "
            f"{counts['fail']} failed); best #{best.number}: {obj}; "
            + ", ".join(f"{k}={format_value(v)}" for k, v in best.params.items())
        )
        if rerun:
            notes += " (re-run here)"
        split = "val" if state.data.val_dataset is not None else "test (no validation split)"
        details = {
            "study_name": study_name,
            "storage": redact(url),
            "objectives": dict(zip(cfg.objectives, self.directions, strict=True)),
            "objective_split": split,
            "sampler": cfg.sampler,
            "pruner": cfg.pruner,
            "counts": counts,
            "trials_before_this_run": ran_before,
            "ran_here": sum(1 for r in table if r.get("ran_here")),
            "search_seconds": round(seconds, 3),
            "best": {
                "number": best.number,
                "values": list(best.values),
                "params": dict(best.params),
                "re_run_here": rerun,
            },
            "trials": table,
        }
        if len(self.directions) > 1:
            details["pareto_front"] = [
                {"number": t.number, "values": list(t.values), "params": dict(t.params)} for t in front
            ]
            notes += f"; Pareto front: {len(front)} trial(s)"
        return notes, details


def objective_value(m: Any, name: str) -> float | None:
    """Objective ``name`` of a trial's measured ``Metrics``: one of its fields (accuracy, latency,
    size, ...), ``score`` (the task's primary metric) or any metric of the task (``m.scores``)."""
    if name == SCORE:
        try:
            return float(m.primary_score()[1])
        except ValueError:
            return None
    value = getattr(m, name, None)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    scores = getattr(m, "scores", None) or {}
    return float(scores[name]) if name in scores else None


def _default_direction(metric: str) -> bool:
    """Whether a higher ``metric`` is better, by name, for a task without ``direction``."""
    from compress_cli.tasks.base import Task

    return Task.direction(metric)


def _epoch_key(objective: str) -> str | None:
    """The per-epoch validation entry the pruner follows for ``objective`` (None: none)."""
    from compress_cli.hpo.space import OBJECTIVES

    if objective == "accuracy":
        return "val_accuracy"
    if objective == SCORE:
        return "val_score"
    return None if objective in OBJECTIVES else f"val_{objective}"
