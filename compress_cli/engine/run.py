"""Runs a recipe: load model and data, measure, run each stage, measure again, snapshot, guard,
and write the compressed model and the report. Stages never measure; this module does, the same
way for all of them. Nothing here prints: progress goes out through ``emit``."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress_cli.config.recipe import Recipe
from compress_cli.config.yaml import recipe_to_yaml
from compress_cli.errors import CompressError, GuardError, Interrupted, StageError, UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from compress_cli.state import State

Emit = Callable[..., None]


MASKS = "masks.safetensors.xz"  # next to a snapshot's state.json: the pruning masks in force


def _noop(*_: Any, **__: Any) -> None:
    pass


def resolve_device(spec: str) -> torch.device:
    import torch

    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"device {spec!r}: CUDA was requested but no CUDA device is available here (use cpu or auto)"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device {spec!r}: MPS is not available here (use cpu or auto)")
    return dev


def seed_everything(seed: int, deterministic: bool = False) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def check_output(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise UsageError(
            f"output {out}: exists and is not empty (use --force to replace it, or --output DIR)"
        )
    parent = next((p for p in [out, *out.parents] if p.exists()), None)
    if parent is not None and not os.access(parent, os.W_OK):
        raise UsageError(f"output {out}: {parent} is not writable")


def prepare_output(out: Path, force: bool) -> None:
    check_output(out, force)
    if out.exists() and any(out.iterdir()):
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"output {out}: not writable ({e.strerror or e})") from None


#: bytes of weights above which the frozen original model waits in a file instead of in memory
ORIGINAL_IN_MEMORY_MAX = 1 << 30


def build_state(recipe: Recipe, device: torch.device, out: Path, emit: Emit = _noop) -> State:
    from compress_cli.sources.data import build_data
    from compress_cli.sources.models import load_model
    from compress_cli.state import State

    seed_everything(recipe.seed, recipe.deterministic)
    data = build_data(recipe.data, recipe.seed, recipe.model.input_shape)
    model, spec = load_model(recipe.model)
    data.check_model(model)
    model.to(device).eval()
    from compress_cli.config.recipe import ModelConfig

    original: nn.Module | Path
    folder = None
    if sum(t.numel() * t.element_size() for t in model.state_dict().values()) > ORIGINAL_IN_MEMORY_MAX:
        # a second copy in memory would be the model's size again for the whole run (ViT-H/14: 2.5 GB)
        import tempfile

        import torch

        folder = tempfile.mkdtemp(prefix="compress-original-")
        original = Path(folder) / "original.pt"
        torch.save(model, original)
    else:
        original = copy.deepcopy(model).eval()
        for p in original.parameters():
            p.requires_grad_(False)
    state = State(
        model=model,
        original=original,
        data=data,
        device=device,
        recipe=recipe,
        model_spec=ModelConfig(source=spec["source"], kwargs=spec.get("kwargs", {})),
        output_dir=out,
        seed=recipe.seed,
        emit=emit,
    )
    if folder is not None:
        import weakref

        weakref.finalize(state, shutil.rmtree, folder, ignore_errors=True)  # goes with the run's state
    return state


def current_runner(state: State) -> Any:
    from compress_cli.runtime.runners import EagerRunner

    return state.runner if state.runner is not None else EagerRunner(state.model, state.device)


def save_snapshot(state: State, directory: Path) -> int:
    from compress_cli.checkpoint import save_model
    from compress_cli.sources.models import build_from_source

    spec = state.model_spec.model_dump(mode="json")
    return save_model(
        state.model,
        directory,
        base=build_from_source(spec),
        model_spec=spec,
        input_shape=list(state.data.input_shape),
        num_classes=state.data.num_classes,
        edits=state.edits.to_json(),
        transforms=state.transforms,
    )


def measure(state: State, model_dir: Path, reference: dict[str, Any] | None) -> dict[str, Any]:
    """Every metric, the same for every stage. ``model_dir`` holds the saved checkpoint."""
    from compress_cli.checkpoint import checkpoint_size
    from compress_cli.runtime.measure import count_macs, evaluate, latency, param_counts

    cfg = state.recipe.measure
    runner = current_runner(state)
    loader = state.data.loader(cfg.split)
    state.emit("measure_start", samples=len(loader.dataset))  # type: ignore[arg-type]
    m: dict[str, Any] = {}
    m.update(evaluate(runner, loader, state.data.num_classes, emit=state.emit))
    m.update(param_counts(state.model))
    m["size_bytes"] = checkpoint_size(model_dir)
    m["macs"] = count_macs(state.model, state.data.example_input(1).to(state.device)) if cfg.macs else None
    if cfg.latency is not None:
        m.update(latency(runner, state.data.input_shape, cfg.latency, state.seed))
    else:
        m.update({"latency_ms": None, "throughput": None})
    m.update(runner.describe())
    if reference is not None:
        m["accuracy_drop"] = round((reference["accuracy"] - m["accuracy"]) * 100, 4)
        m["size_ratio"] = reference["fp32_bytes"] / m["size_bytes"] if m["size_bytes"] else None
        if m.get("latency_ms") and reference.get("latency_ms"):
            m["speedup"] = reference["latency_ms"] / m["latency_ms"]
            m["throughput_ratio"] = m["throughput"] / reference["throughput"]
    state.emit("measure_end", metrics=m)
    return m


def guard_violations(recipe: Recipe, m: dict[str, Any], base: dict[str, Any]) -> list[str]:
    g = recipe.guard
    out = []
    drop = (base["accuracy"] - m["accuracy"]) * 100
    if g.max_accuracy_drop is not None and drop > g.max_accuracy_drop:
        out.append(f"guard.max_accuracy_drop: accuracy fell {drop:.2f} points (limit {g.max_accuracy_drop})")
    if g.max_latency_ms is not None and (m.get("latency_ms") or 0) > g.max_latency_ms:
        out.append(f"guard.max_latency_ms: latency {m['latency_ms']:.3f} ms (limit {g.max_latency_ms})")
    if g.max_size_bytes is not None and m["size_bytes"] > g.max_size_bytes:
        out.append(f"guard.max_size_bytes: checkpoint {m['size_bytes']} bytes (limit {g.max_size_bytes})")
    if g.min_speedup is not None and (m.get("speedup") or 0) < g.min_speedup:
        out.append(f"guard.min_speedup: speedup {m.get('speedup') or 0:.2f}x (limit {g.min_speedup}x)")
    return out


def run_recipe(
    recipe: Recipe,
    *,
    force: bool = False,
    device: str | None = None,
    emit: Emit = _noop,
    resume: bool = False,
) -> dict[str, Any]:
    """Run every stage; write OUTPUT/{recipe.yaml, report.*, model/, stages/}. Returns the report.

    ``resume`` continues from the last complete stage snapshot of an earlier run of the same recipe.
    """
    if device:
        recipe = recipe.model_copy(update={"device": device})
    try:
        return Run(recipe, emit).execute(force=force, resume=resume)
    except OSError as e:  # disk full, permissions changed mid-run, ...
        where = f" ({e.filename})" if e.filename else ""
        raise StageError(f"cannot write to output {recipe.output_dir()}{where}: {e.strerror or e}") from e


def top_digest(recipe: Recipe) -> str:
    """What a resumed run must share with the snapshot: model, data, seed, measurement."""
    d = recipe.model_dump(mode="json", include={"model", "data", "seed", "deterministic", "measure"})
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def stage_dump(cfg: Any) -> dict[str, Any]:
    return cfg.model_dump(mode="json", exclude={"name", "on_violation"})


class Run:
    """One execution of a recipe: owns the output directory, snapshots, guards and signals."""

    def __init__(self, recipe: Recipe, emit: Emit = _noop):
        self.recipe = recipe
        self.emit = emit
        self.out = recipe.output_dir()
        self.snap_root = self.out / "stages"
        self.stop_reason: str | None = None
        self.signal: int | None = None
        self.t0 = time.perf_counter()

    # -- signals and budget --------------------------------------------------------------
    def should_stop(self) -> bool:
        if self.signal is not None:
            return True
        budget = self.recipe.time_budget_s
        if budget is not None and time.perf_counter() - self.t0 > budget:
            self.stop_reason = f"time_budget_s ({budget:g} s) spent"
            return True
        return False

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.signal is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum
        self.emit(
            "message", text=f"{signal.Signals(signum).name} received: finishing the current step, then saving"
        )

    @contextmanager
    def _signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    # -- snapshots ------------------------------------------------------------------------
    def _stage_dir(self, i: int, cfg: Any) -> Path:
        return self.snap_root / f"{i:02d}-{cfg.type}"

    def _write_state(self, d: Path, state: State, **extra: Any) -> None:
        import numpy as np
        import torch

        from compress_cli._utils.io import atomic_write_bytes, atomic_write_text
        from compress_cli.checkpoint.codec import encode_state_dict
        from compress_cli.pruning.unstructured import masks

        # the pruning masks in force: a resumed (or reverted-to) model must keep its zeros through
        # later training exactly as the uninterrupted run does; one bit per weight, entropy-coded
        held = masks(state.model)
        if held:
            packed = {k: torch.from_numpy(np.packbits(m.cpu().numpy().reshape(-1))) for k, m in held.items()}
            atomic_write_bytes(d / MASKS, encode_state_dict(packed)[0])
        else:
            (d / MASKS).unlink(missing_ok=True)

        payload = {
            "top_digest": top_digest(self.recipe),
            "hparams": state.hparams,
            "edits": state.edits.to_json(),
            "transforms": state.transforms,
            "model_spec": state.model_spec.model_dump(mode="json"),
            **extra,
        }
        atomic_write_text(d / "state.json", json.dumps(payload, indent=2, default=str))

    def _restore(self, state: State, d: Path) -> None:
        """Make ``state`` what it was right after the snapshot in ``d``."""
        from compress_cli.checkpoint import restore_transforms
        from compress_cli.config.recipe import ModelConfig
        from compress_cli.sources.models import load_model_dir, trusted_sources
        from compress_cli.state import Edit, EditLog

        saved = json.loads((d / "state.json").read_text())
        model = load_model_dir(d / "model", trust_source=trusted_sources(self.recipe), apply_transforms=False)
        state.model = model.to(state.device)  # as the stage left it
        if (d / MASKS).is_file():
            import math

            import numpy as np
            import torch

            from compress_cli.checkpoint.codec import decode_state_dict
            from compress_cli.pruning.unstructured import apply_masks

            held = {}
            for key, bits in decode_state_dict((d / MASKS).read_bytes()).items():
                shape = state.model.get_parameter(key).shape  # the mask's tensor, a plain parameter now
                flat = np.unpackbits(bits.numpy())[: math.prod(shape)].astype(bool)
                held[key] = torch.from_numpy(flat).reshape(shape)
            apply_masks(state.model, held)
        state.hparams = dict(saved["hparams"])
        state.transforms = list(saved["transforms"])
        state.edits = EditLog(
            [Edit(e.pop("stage"), e.pop("op"), e) for e in (dict(x) for x in saved["edits"])]
        )
        state.model_spec = ModelConfig(**saved["model_spec"])
        state.runner = None
        restore_transforms(state)  # e.g. quantize: the int8 runtime and its runner

    def _resume_point(self) -> tuple[int, list[dict[str, Any]], dict[str, Any]]:
        """(last complete stage index, their report entries, baseline) or a UsageError."""
        base = self.snap_root / "00-baseline" / "state.json"
        if not base.is_file():
            raise UsageError(
                f"--resume: no snapshot in {self.snap_root} to resume from (run without --resume)"
            )
        saved = json.loads(base.read_text())
        if saved.get("top_digest") != top_digest(self.recipe):
            raise UsageError(
                "--resume: the recipe's model, data, seed or measure section changed since the snapshot; "
                "run without --resume (with --force) to start over"
            )
        entries: list[dict[str, Any]] = []
        last = 0
        for i, cfg in enumerate(self.recipe.stages, start=1):
            f = self._stage_dir(i, cfg) / "state.json"
            if not f.is_file():
                break
            snap = json.loads(f.read_text())
            if snap.get("stage") != stage_dump(cfg):
                changed = sorted(
                    k
                    for k in set(snap.get("stage", {})) | set(stage_dump(cfg))
                    if snap.get("stage", {}).get(k) != stage_dump(cfg).get(k)
                )
                raise UsageError(
                    f"--resume: stages[{i - 1}] ({cfg.type}) differs from its snapshot (changed: {', '.join(changed)}); "
                    "run without --resume (with --force) to start over"
                )
            entries.append(snap["entry"])
            last = i
        stray = [
            p.name
            for p in self.snap_root.iterdir()
            if p.is_dir() and p.name[:2].isdigit() and int(p.name[:2]) > len(self.recipe.stages)
        ]
        if stray:
            raise UsageError(
                f"--resume: snapshots {', '.join(sorted(stray))} belong to stages the recipe no longer has"
            )
        return last, entries, saved["baseline"]

    # -- the run ----------------------------------------------------------------------------
    def execute(self, force: bool, resume: bool) -> dict[str, Any]:
        from compress_cli._utils.io import atomic_write_text
        from compress_cli._version import __version__
        from compress_cli.runtime import distributed

        recipe, out = self.recipe, self.out
        dev = distributed.setup(resolve_device(recipe.device))
        main = distributed.is_main()  # under torchrun only rank 0 writes files and measures
        if resume and distributed.world_size() > 1:
            raise UsageError("--resume is not supported under torchrun; resume with a single process")
        if resume:
            start, entries, baseline = self._resume_point()
        elif main:
            check_output(out, force)
        self.emit("setup", recipe=recipe.name, device=str(dev), output=str(out))
        state = build_state(
            recipe, dev, out, self.emit
        )  # bad model/data fail here, before anything is written
        state.should_stop = self.should_stop
        refused = preflight(state, skip=start if resume else 0)
        if refused:  # before any file is written or anything trains
            raise StageError(refused)
        report: dict[str, Any] = {
            "recipe": recipe.name,
            "tool_version": __version__,
            "device": str(dev),
            "seed": recipe.seed,
            "output": str(out),
            "stages": [],
        }
        if not main:
            distributed.barrier()
            return _run_stages_secondary(state, report)
        with self._signals():
            if resume:
                report["resumed_after_stage"] = start
                report["stages"] = entries
                if start:
                    self._restore(state, self._stage_dir(start, recipe.stages[start - 1]))
                self.emit("message", text=f"resuming after stage {start} of {len(recipe.stages)}")
            else:
                prepare_output(out, force)
                atomic_write_text(out / "recipe.yaml", recipe_to_yaml(recipe))
                start = 0
            distributed.barrier()
            if not resume:
                baseline = self._measure_baseline(state)
            report["baseline"] = baseline
            self.emit("baseline", metrics=baseline)
            return self._stages(state, report, start)

    def _measure_baseline(self, state: State) -> dict[str, Any]:
        from compress_cli.runtime.measure import fp32_state_dict_bytes

        d = self.snap_root / "00-baseline"
        save_snapshot(state, d / "model")
        baseline = measure(state, d / "model", None)
        baseline["fp32_bytes"] = fp32_state_dict_bytes(state.original_model())
        baseline["size_ratio"] = baseline["fp32_bytes"] / baseline["size_bytes"]
        baseline["guard_violations"] = guard_violations(self.recipe, baseline, baseline)
        self._write_state(d, state, baseline=baseline, stage=None)
        return baseline

    def _stages(self, state: State, report: dict[str, Any], start: int) -> dict[str, Any]:
        from compress_cli.stages.registry import get_stage

        recipe = self.recipe
        baseline = report["baseline"]
        # the latest snapshot that satisfies every guard: what a failed guard leaves as the result
        ok = [(0, self.snap_root / "00-baseline")] if not baseline["guard_violations"] else []
        ok += [
            (e["index"], self._stage_dir(e["index"], recipe.stages[e["index"] - 1]))
            for e in report["stages"]
            if not e.get("guard_violations")
        ]
        last_metrics = report["stages"][-1]["metrics"] if report["stages"] else baseline
        for i, cfg in enumerate(recipe.stages, start=1):
            if i <= start:
                continue
            if self.should_stop():
                report["skipped"] = [f"{j}. {c.type}" for j, c in enumerate(recipe.stages, start=1) if j >= i]
                break
            stage = get_stage(cfg.type)(cfg, i)
            sdir = self._stage_dir(i, cfg)
            state.stage_dir = sdir
            self.emit("stage_start", index=i, total=len(recipe.stages), name=stage.name, type=cfg.type)
            seed_everything(recipe.seed + i, recipe.deterministic)  # a resumed run draws the same numbers
            ts = time.perf_counter()
            try:
                result = stage.run(state)
                release_memory()
                check_finite(state)
            except CompressError as e:
                e.problems = [f"stages[{i - 1}] ({cfg.type}): {p}" for p in e.problems]
                self._write_partial(report, last_metrics, f"stage {i} ({cfg.type}) failed: {e}")
                raise
            except KeyboardInterrupt:
                self.signal = self.signal or signal.SIGINT
                result = None
            except Exception as e:
                self._write_partial(report, last_metrics, f"stage {i} ({cfg.type}) failed: {e}")
                raise StageError(f"stages[{i - 1}] ({cfg.type}): {type(e).__name__}: {e}") from e
            if self.signal is not None:
                kept = ""
                with contextlib.suppress(Exception):
                    save_snapshot(state, sdir / "interrupted" / "model")
                    kept = f"; its partial model is in {sdir / 'interrupted' / 'model'}"
                msg = (
                    f"interrupted by {signal.Signals(self.signal).name} during stage {i} ({cfg.type}); "
                    f"stages 1..{i - 1} are kept in {self.snap_root}{kept}"
                )
                self._write_partial(report, last_metrics, msg)
                raise Interrupted(msg)
            assert result is not None
            entry = self._finish_stage(state, stage, result, sdir, time.perf_counter() - ts, baseline)
            report["stages"].append(entry)
            self.emit("stage_end", index=i, entry=entry)
            if entry.get("guard_violations"):
                action = cfg.on_violation or "warn"
                entry["on_violation"] = action
                if action == "fail":
                    return self._fail(state, report, ok, entry["guard_violations"])
                if action == "revert":
                    entry["rejected_metrics"] = entry["metrics"]
                    entry["metrics"] = last_metrics  # the model is the previous stage's again
                    self._revert(state, sdir, ok[-1][1] if ok else self.snap_root / "00-baseline", entry)
                    ok.append((i, sdir))
                    continue
            else:
                ok.append((i, sdir))
            last_metrics = entry["metrics"]
        if self.stop_reason and "skipped" in report:
            report["stopped_early"] = self.stop_reason
        violations = guard_violations(recipe, last_metrics, baseline)
        if violations and recipe.guard.on_violation != "warn":
            if recipe.guard.on_violation == "fail":
                return self._fail(state, report, ok, violations)
            report["reverted_to"] = ok[-1][0] if ok else 0
        return self._finalise(
            state, report, violations, ok if violations and recipe.guard.on_violation == "revert" else None
        )

    def _finish_stage(
        self, state: State, stage: Any, result: Any, sdir: Path, duration: float, baseline: dict[str, Any]
    ) -> dict[str, Any]:
        save_snapshot(state, sdir / "model")
        metrics = measure(state, sdir / "model", baseline)
        entry = {
            "index": stage.index,
            "name": stage.name,
            "type": stage.type_name,
            "duration_s": round(duration, 3),
            "metrics": metrics,
            "notes": result.notes,
            "details": result.details,
            "artifacts": result.artifacts,
        }
        v = guard_violations(self.recipe, metrics, baseline)
        if v:
            entry["guard_violations"] = v
        self._write_state(sdir, state, entry=entry, stage=stage_dump(stage.config))
        return entry

    def _revert(self, state: State, sdir: Path, previous: Path, entry: dict[str, Any]) -> None:
        """Keep the rejected model for inspection, go back to ``previous``, re-snapshot as this stage."""
        rejected = sdir / "rejected"
        if rejected.exists():
            shutil.rmtree(rejected)
        shutil.move(str(sdir / "model"), str(rejected))
        self._restore(state, previous)
        save_snapshot(state, sdir / "model")
        entry["reverted"] = True
        entry["notes"] = (
            entry.get("notes") or ""
        ) + f" — reverted (guard violated; rejected model in {rejected})"
        self._write_state(sdir, state, entry=entry, stage=stage_dump(self.recipe.stages[entry["index"] - 1]))

    def _fail(
        self, state: State, report: dict[str, Any], ok: list[tuple[int, Path]], violations: list[str]
    ) -> dict[str, Any]:
        self._finalise(state, report, violations, ok)
        kept = f"stage {ok[-1][0]}" if ok and ok[-1][0] else "the baseline"
        raise GuardError(
            [*violations, f"kept the last result that satisfies every guard ({kept}) in {self.out / 'model'}"]
        )

    def _finalise(
        self,
        state: State,
        report: dict[str, Any],
        violations: list[str],
        fallback: list[tuple[int, Path]] | None,
    ) -> dict[str, Any]:
        from compress_cli.report import write_report

        final_dir = self.out / "model"
        if fallback is not None:  # the result is the last snapshot that satisfied the guards
            idx, src = fallback[-1] if fallback else (0, self.snap_root / "00-baseline")
            tmp = self.out / ".model.tmp"
            if tmp.exists():
                shutil.rmtree(tmp)
            shutil.copytree(src / "model", tmp)
            if final_dir.exists():
                shutil.rmtree(final_dir)
            tmp.rename(final_dir)
            final = dict(
                report["baseline"]
                if idx == 0
                else next(e["metrics"] for e in report["stages"] if e["index"] == idx)
            )
            final["result_from_stage"] = idx
        else:
            save_snapshot(state, final_dir)
            final = dict(report["stages"][-1]["metrics"] if report["stages"] else report["baseline"])
            same = getattr(state.runner, "same_runtime_baseline", None)
            if callable(same):
                final["same_runtime_baseline"] = same(state)
        report["final"] = final
        report["hparams"] = state.hparams
        report["edits"] = state.edits.to_json()
        report["guard"] = {"violations": violations, **self.recipe.guard.model_dump()}
        report["duration_s"] = round(time.perf_counter() - self.t0, 3)
        write_report(report, self.out)
        self.emit("done", report=report)
        return report

    def _write_partial(self, report: dict[str, Any], last: dict[str, Any], error: str) -> None:
        from compress_cli.report import write_report

        if "baseline" not in report:
            return
        partial = dict(report, final=last, error=error, incomplete=True)
        with contextlib.suppress(Exception):
            write_report(partial, self.out)


def _run_stages_secondary(state: State, report: dict[str, Any]) -> dict[str, Any]:
    """A rank other than 0 under torchrun: run the same stages (so collective operations match),
    write nothing, measure nothing."""
    from compress_cli.stages.registry import get_stage

    for i, cfg in enumerate(state.recipe.stages, start=1):
        state.stage_dir = None
        seed_everything(state.recipe.seed + i, state.recipe.deterministic)  # as rank 0 does
        try:
            get_stage(cfg.type)(cfg, i).run(state)
        except CompressError as e:
            e.problems = [f"stages[{i - 1}] ({cfg.type}): {p}" for p in e.problems]
            raise
        except Exception as e:
            raise StageError(f"stages[{i - 1}] ({cfg.type}): {type(e).__name__}: {e}") from e
    report["hparams"] = state.hparams
    return report


def preflight(state: State, configs: Any = None, where: str = "stages", skip: int = 0) -> list[str]:
    """Every stage's (and nested stage's) :meth:`Stage.preflight` against the loaded model, before
    anything runs: the located refusals, one line each (empty: all stages can apply). The first
    ``skip`` stages (already done, on --resume) are not checked."""
    from compress_cli.stages.registry import get_stage

    problems: list[str] = []
    for i, cfg in enumerate(state.recipe.stages if configs is None else configs, start=1):
        if i <= skip:
            continue
        cls = get_stage(cfg.type)
        try:
            cls(cfg, i).preflight(state)
        except CompressError as e:
            problems += [f"{where}[{i - 1}] ({cfg.type}): {p}" for p in e.problems]
        for field, children in cls.children(cfg):
            problems += preflight(state, children, f"{where}[{i - 1}].{field}")
    return problems


def release_memory() -> None:
    """Hand the memory a stage freed back to the operating system. A stage's temporaries (model
    copies, an ONNX file in memory) are freed when it returns, but glibc keeps much of the heap they
    used, and the next stage's peak comes on top: ViT-H/14 (632M parameters) held 10.2 GB resident
    after prune_channels, 5.3 GB after this."""
    import ctypes
    import gc

    gc.collect()  # reference cycles (torch-pruning's dependency graph) hold tensors until collected
    with contextlib.suppress(OSError, AttributeError):  # glibc only; elsewhere there is nothing to do
        ctypes.CDLL(None).malloc_trim(0)


def check_finite(state: State) -> None:
    import torch

    bad = [
        n
        for n, t in state.model.state_dict().items()
        if t.is_floating_point() and not torch.isfinite(t).all()
    ]
    if bad:
        raise StageError(
            f"weights contain NaN/inf after this stage ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); "
            "the previous stage's snapshot is kept"
        )
