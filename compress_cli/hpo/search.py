"""The search behind the ``hpo`` stage: Optuna study, trials over copies of the state, best trial kept.

How a search ends and what counts:

- ``n_trials`` is the number of trials in the *study*, whatever their state and whichever worker or
  run made them. Before each new trial a worker counts the study's trials (running ones included);
  a trial that another worker's concurrent start pushed past the limit is closed at once as pruned
  with the user attribute ``overflow`` and never runs (it is left out of the trial table).
- A wrapped stage's error marks its trial FAIL (the message is kept as user attribute ``error``) and
  the search goes on; KeyboardInterrupt (and SIGTERM, turned into one while the search runs unless a
  handler is already installed) marks the running trial FAIL before it propagates. With a database
  storage a heartbeat lets later workers mark trials of a killed worker failed.
- The best trial (single objective) or the Pareto trial with the best first objective is applied.
  Its model is kept in memory when it ran in this process; otherwise (another worker, an earlier
  run) its parameters are run again here with the same trial seed.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import signal
import socket
import tempfile
import threading
import time
import uuid
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress_cli.errors import CompressError, StageError

if TYPE_CHECKING:
    from compress_cli.stages.base import StageResult
    from compress_cli.stages.hpo import Hpo, HpoConfig
    from compress_cli.state import State


@dataclass
class Outcome:
    """What a finished trial leaves: its state (model, edits, ...) and objective values."""

    state: State
    values: list[float]


@contextlib.contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Seed python, numpy and torch with ``seed`` inside; restore the callers' generators after."""
    import numpy as np
    import torch

    py, npst = random.getstate(), np.random.get_state()
    devices = (
        [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    )
    with torch.random.fork_rng(devices=devices):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npst)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the search runs, SIGTERM raises KeyboardInterrupt (so Optuna marks the running trial
    FAIL) unless someone already handles SIGTERM (then their handler stays in charge)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous not in (signal.SIG_DFL, None):
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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


def storage_url(spec: str | None, state: State, index: int) -> str | None:
    """The study's SQLAlchemy URL (None: in memory)."""
    if spec == "memory":
        return None
    if spec is None:
        path = Path(state.output_dir).resolve() / f"hpo-{index:02d}.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    return with_driver(spec)


def with_driver(url: str) -> str:
    """``postgresql://`` without a driver: name one that is installed (SQLAlchemy 2.1 assumes
    psycopg 3, older versions psycopg2; the ``postgres`` extra installs psycopg2-binary)."""
    import importlib.util

    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        return url
    for module, driver in (("psycopg2", "psycopg2"), ("psycopg", "psycopg")):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{driver}://{rest}"
    return f"postgresql://{rest}"


def redact(url: str | None) -> str:
    if url is None:
        return "memory"
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url


def open_storage(url: str | None, heartbeat_s: int | None) -> Any:
    import optuna

    if url is None:
        return optuna.storages.InMemoryStorage()
    kw: dict[str, Any] = {}
    if heartbeat_s is not None:
        kw.update(heartbeat_interval=heartbeat_s, grace_period=3 * heartbeat_s)
    last: Exception | None = None
    for attempt in range(3):  # workers starting together may race to create the tables
        try:
            return optuna.storages.RDBStorage(url, **kw)
        except ImportError as e:
            raise StageError(
                f"storage {redact(url)}: a database driver is missing ({e}); for PostgreSQL "
                "install the 'postgres' extra (psycopg2-binary)"
            ) from None
        except Exception as e:
            last = e
            time.sleep(0.5 + random.random() * (attempt + 1))
    raise StageError(
        f"storage {redact(url)}: cannot open the study database: {type(last).__name__}: "
        f"{str(last).splitlines()[0] if str(last) else ''}"
    ) from None


def make_sampler(cfg: HpoConfig, seed: int, shared: bool) -> Any:
    import optuna

    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if cfg.sampler == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise StageError("sampler cmaes needs the 'cmaes' package (pip install cmaes)") from None
        return optuna.samplers.CmaEsSampler(
            seed=seed, n_startup_trials=cfg.sampler_startup_trials, warn_independent_sampling=False
        )
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=cfg.sampler_startup_trials, constant_liar=shared
    )


def make_pruner(cfg: HpoConfig) -> Any:
    import optuna

    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=cfg.pruner_startup_trials, n_warmup_steps=cfg.pruner_warmup_epochs
        )
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.NopPruner()


def suggest(trial: Any, key: str, dist: Any) -> Any:
    if dist.categorical is not None:
        return trial.suggest_categorical(key, dist.categorical)
    if dist.int_ is not None:
        lo, hi = dist.int_
        return trial.suggest_int(key, lo, hi, step=int(dist.step or 1), log=dist.log)
    lo, hi = dist.float_
    return trial.suggest_float(key, lo, hi, step=dist.step, log=dist.log)


class _Pruned(Exception):
    """Raised from the epoch callback; Optuna's TrialPruned is raised from it outside the stages
    (so a wrapped stage that re-wraps exceptions cannot turn a pruning into a failure)."""


class Search:
    """One ``hpo`` stage run: the objective, the kept outcomes, the final choice."""

    def __init__(self, stage: Hpo, state: State):
        from compress_cli.stages.hpo import OBJECTIVES, resolve_space_key

        self.stage = stage
        self.cfg: HpoConfig = stage.config
        self.state = state
        self.directions = [OBJECTIVES[o] for o in self.cfg.objectives]
        self.paths = {k: resolve_space_key(self.cfg.stages, k) for k in self.cfg.space}
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"  # this search
        self.kept: dict[int, Outcome] = {}
        self.study: Any = None

    # ------------------------------------------------------------------ one trial
    def trial_state(self, number: int) -> State:
        s = self.state
        base_emit = s.emit

        def emit(kind: str, **kw: Any) -> None:
            if kind in ("epoch_start", "epoch_end", "step") and "label" in kw:
                kw["label"] = f"trial {number} {kw['label']}"
            if kind in ("epoch_start", "epoch_end", "step", "message", "eval_step"):
                base_emit(kind, **kw)

        from compress_cli.checkpoint import copy_model

        trial_dir = Path(s.output_dir) / f"hpo-{self.stage.index:02d}-trials" / f"trial-{number:03d}"
        return replace(
            s,
            model=copy_model(s.model),
            hparams=copy.deepcopy(s.hparams),
            edits=copy.deepcopy(s.edits),
            transforms=copy.deepcopy(s.transforms),
            runner=None,
            emit=emit,
            stage_dir=trial_dir,
            output_dir=trial_dir,
            epoch_callbacks=[],
        )

    def run_trial(self, trial: Any, *, rerun: bool = False) -> list[float]:
        import optuna

        from compress_cli.stages.hpo import with_params
        from compress_cli.stages.registry import get_stage

        cfg = self.cfg
        if not rerun:
            if cfg.n_trials is not None and trial.number >= cfg.n_trials:
                trial.set_user_attr("overflow", True)  # a concurrent worker filled the study first
                self.study.stop()
                raise optuna.TrialPruned("overflow: the study already has n_trials trials")
            trial.set_user_attr("worker", self.worker)
        params = {key: suggest(trial, key, dist) for key, dist in cfg.space.items()}
        by_stage: dict[int, dict[str, Any]] = {}
        for key, (index, path) in self.paths.items():
            by_stage.setdefault(index, {})[path] = params[key]
        try:
            configs = [with_params(c, by_stage[i]) if i in by_stage else c for i, c in enumerate(cfg.stages)]
        except Exception as e:  # a combination the wrapped stage refuses
            return self._fail(trial, f"parameters {params} rejected: {str(e).splitlines()[0]}")
        sub = self.trial_state(trial.number)
        step = [0]
        pruned = [False]
        single = len(cfg.objectives) == 1

        def report(epoch: int, metrics: dict[str, float]) -> None:
            acc = metrics.get("val_accuracy")
            if acc is None or not single:
                return
            trial.report(float(acc), step[0])
            step[0] += 1
            if trial.should_prune():
                pruned[0] = True
                raise _Pruned(f"pruned after epoch {step[0]} (val accuracy {acc:.4f})")

        sub.epoch_callbacks = [report]
        t0 = time.perf_counter()
        try:
            with isolated_rng(self.trial_seed(trial.number)):
                for i, c in enumerate(configs):
                    get_stage(c.type)(c, i).run(sub)
                    if self.state.should_stop():
                        raise StageError("interrupted (the run was asked to stop)")
                values = self.objective_values(sub)
        except _Pruned as e:
            trial.set_user_attr("epochs", step[0])
            raise optuna.TrialPruned(str(e)) from None
        except CompressError as e:
            if pruned[0]:
                raise optuna.TrialPruned(f"pruned after epoch {step[0]}") from None
            return self._fail(trial, "; ".join(e.problems))
        except Exception as e:
            if pruned[0]:
                raise optuna.TrialPruned(f"pruned after epoch {step[0]}") from None
            return self._fail(trial, f"{type(e).__name__}: {e}")
        trial.set_user_attr("epochs", step[0])
        trial.set_user_attr("seconds", round(time.perf_counter() - t0, 3))
        if not all(math.isfinite(v) for v in values):
            return self._fail(trial, f"objective is not finite: {values}")
        self.keep(trial.number, Outcome(sub, values))
        self.state.emit(
            "message",
            text=f"{self.stage.name}: trial {trial.number} "
            + ", ".join(f"{o} {v:.4g}" for o, v in zip(cfg.objectives, values, strict=True)),
        )
        return values

    def _fail(self, trial: Any, message: str) -> Any:
        trial.set_user_attr("error", message[:500])
        self.state.emit("message", text=f"{self.stage.name}: trial {trial.number} failed: {message[:200]}")
        raise StageError(message)

    def trial_seed(self, number: int) -> int:
        return (self.state.seed + 1) * 1_000_003 + number

    def objective_values(self, sub: State) -> list[float]:
        from compress_cli.config.recipe import LatencyConfig
        from compress_cli.engine.run import current_runner, save_snapshot
        from compress_cli.runtime.measure import count_macs, evaluate, latency, param_counts

        runner = current_runner(sub)
        out: list[float] = []
        for o in self.cfg.objectives:
            if o == "accuracy":
                out.append(float(evaluate(runner, sub.data.loader("val"), sub.data.num_classes)["accuracy"]))
            elif o == "latency_ms":
                lat = getattr(
                    getattr(sub.recipe, "measure", None), "latency", None
                ) or LatencyConfig.model_validate({})
                lat = lat.model_copy(update={"batch_sizes": [lat.batch_sizes[0]]})
                out.append(float(latency(runner, sub.data.input_shape, lat, sub.seed)["latency_ms"]))
            elif o == "size_bytes":
                with tempfile.TemporaryDirectory(prefix="compress-hpo-") as d:
                    out.append(float(save_snapshot(sub, Path(d) / "model")))
            elif o == "nonzero_params":
                out.append(float(param_counts(sub.model)["nonzero_params"]))
            else:
                macs = count_macs(sub.model, sub.data.example_input(1).to(sub.device))
                out.append(float(macs) if macs is not None else math.nan)
        return out

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
        return sum(1 for t in self.study.get_trials(deepcopy=False) if not t.user_attrs.get("overflow"))

    def run(self) -> StageResult:
        import optuna

        from compress_cli.runtime import distributed

        cfg, state = self.cfg, self.state
        if distributed.active():
            raise StageError(
                "hpo runs its trials in one process; under torchrun start separate `compress run` "
                "workers that share a storage instead (see docs/tuning.md)"
            )
        url = storage_url(cfg.storage, state, self.stage.index)
        shared = cfg.storage not in (None, "memory")
        recipe_name = getattr(state.recipe, "name", None) or "compress"
        study_name = cfg.study_name or f"{recipe_name}-{self.stage.name}-{self.stage.index}"
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
                    sampler=make_sampler(cfg, seed, shared),
                    pruner=make_pruner(cfg),
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
                if state.should_stop() or (cfg.n_trials is not None and self.study_count() >= cfg.n_trials):
                    study.stop()

            t0 = time.perf_counter()
            ran_before = self.study_count()
            if cfg.n_trials is None or ran_before < cfg.n_trials:
                with sigterm_as_interrupt():
                    self.study.optimize(
                        self.run_trial,
                        timeout=cfg.timeout_s,
                        callbacks=[stop_when_done],
                        catch=(StageError,),
                        gc_after_trial=False,
                        show_progress_bar=False,
                    )
            return self.finish(study_name, url, time.perf_counter() - t0, ran_before)

    def finish(self, study_name: str, url: str | None, seconds: float, ran_before: int) -> StageResult:
        import optuna

        from compress_cli.stages.base import StageResult

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
            state.emit(
                "message",
                text=f"{self.stage.name}: best trial {best.number} ran elsewhere; "
                "running its parameters here",
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
        state.edits.record(self.stage.name, op="hpo", best_trial=best.number, params=dict(best.params))
        table = [_row(t, self.worker) for t in trials]
        obj = ", ".join(f"{o} {v:.4g}" for o, v in zip(cfg.objectives, best.values, strict=True))
        notes = (
            f"{len(trials)} trials ({counts['complete']} complete, {counts['pruned']} pruned, "
            f"{counts['fail']} failed); best #{best.number}: {obj}; "
            + ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items())
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
        return StageResult(notes=notes, details=details)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _row(t: Any, worker: str) -> dict[str, Any]:
    dur = (
        (t.datetime_complete - t.datetime_start).total_seconds()
        if t.datetime_complete and t.datetime_start
        else None
    )
    row: dict[str, Any] = {
        "number": t.number,
        "state": t.state.name.lower(),
        "values": list(t.values) if t.values is not None else None,
        "params": dict(t.params),
        "epochs_reported": len(t.intermediate_values),
        "duration_s": None if dur is None else round(dur, 3),
        "ran_here": t.user_attrs.get("worker") == worker,
    }
    if t.user_attrs.get("defaults"):
        row["defaults"] = True
    if t.user_attrs.get("error"):
        row["error"] = t.user_attrs["error"]
    return row


def run_search(stage: Hpo, state: State) -> StageResult:
    return Search(stage, state).run()
