"""Runs a recipe: load model and data, measure, run each stage, measure again, snapshot, guard,
and write the compressed model and the report. Stages never measure; this module does, the same
way for all of them. Nothing here prints: progress goes out through ``emit``."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CompressError, GuardError, StageError, UsageError
from .recipe import Recipe, recipe_to_yaml

if TYPE_CHECKING:
    import torch

    from .state import State

Emit = Callable[..., None]


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
            raise UsageError(f"device {spec!r}: CUDA was requested but no CUDA device is available here (use cpu or auto)")
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
        raise UsageError(f"output {out}: exists and is not empty (use --force to replace it, or --output DIR)")
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


def build_state(recipe: Recipe, device: torch.device, out: Path, emit: Emit = _noop) -> State:
    from .sources.data import build_data
    from .sources.models import load_model
    from .state import State

    seed_everything(recipe.seed, recipe.deterministic)
    data = build_data(recipe.data, recipe.seed, recipe.model.input_shape)
    model, spec = load_model(recipe.model)
    check_model_fits_data(model, data)
    model.to(device).eval()
    original = copy.deepcopy(model).eval()
    for p in original.parameters():
        p.requires_grad_(False)
    from .recipe import ModelConfig

    return State(
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


def check_model_fits_data(model: Any, data: Any) -> None:
    """One forward pass on a data sample: shapes and class counts must agree."""
    import torch

    from .errors import SourceError

    x = data.example_input(2)
    try:
        with torch.no_grad():
            model.eval()
            y = model(x)
    except Exception as e:
        raise SourceError(
            f"model does not accept the data's input shape {list(data.input_shape)} "
            f"({type(e).__name__}: {str(e).splitlines()[0]}); check model.input_shape / the data source"
        ) from None
    if not isinstance(y, torch.Tensor) or y.dim() != 2:
        raise SourceError(f"model output should be (batch, classes) logits, got {getattr(y, 'shape', type(y))}")
    if data.labelled and y.shape[1] != data.num_classes:
        raise SourceError(
            f"model outputs {y.shape[1]} classes but the data has {data.num_classes} (set model.kwargs.num_classes)"
        )


def current_runner(state: State) -> Any:
    from .runners import EagerRunner

    return state.runner if state.runner is not None else EagerRunner(state.model, state.device)


def save_snapshot(state: State, directory: Path) -> int:
    from .checkpoint import save_model

    return save_model(
        state.model,
        directory,
        model_spec=state.model_spec.model_dump(mode="json"),
        input_shape=list(state.data.input_shape),
        num_classes=state.data.num_classes,
        edits=state.edits.to_json(),
        transforms=state.transforms,
    )


def measure(state: State, model_dir: Path, reference: dict[str, Any] | None) -> dict[str, Any]:
    """Every metric, the same for every stage. ``model_dir`` holds the saved checkpoint."""
    from .checkpoint import checkpoint_size
    from .measure import count_macs, evaluate, latency, param_counts

    cfg = state.recipe.measure
    runner = current_runner(state)
    state.emit("measure_start", samples=len(state.data.loader(cfg.split).dataset))
    m: dict[str, Any] = {}
    m.update(evaluate(runner, state.data.loader(cfg.split), state.data.num_classes, emit=state.emit))
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


def run_recipe(recipe: Recipe, *, force: bool = False, device: str | None = None, emit: Emit = _noop) -> dict[str, Any]:
    """Run every stage; write OUTPUT/{recipe.yaml, report.*, model/, stages/}. Returns the report."""
    from . import __version__
    from .checkpoint import atomic_write_text
    from .measure import fp32_state_dict_bytes
    from .registry import get_stage
    from .report import write_report

    t0 = time.perf_counter()
    if device:
        recipe = recipe.model_copy(update={"device": device})
    out = recipe.output_dir()
    dev = resolve_device(recipe.device)
    check_output(out, force)
    emit("setup", recipe=recipe.name, device=str(dev), output=str(out))
    state = build_state(recipe, dev, out, emit)  # bad model/data fail here, before anything is written
    prepare_output(out, force)
    atomic_write_text(out / "recipe.yaml", recipe_to_yaml(recipe))
    report: dict[str, Any] = {
        "recipe": recipe.name,
        "tool_version": __version__,
        "device": str(dev),
        "seed": recipe.seed,
        "output": str(out),
        "stages": [],
    }
    snap_root = out / "stages"
    base_dir = snap_root / "00-baseline" / "model"
    save_snapshot(state, base_dir)
    baseline = measure(state, base_dir, None)
    baseline["fp32_bytes"] = fp32_state_dict_bytes(state.original)
    baseline["size_ratio"] = baseline["fp32_bytes"] / baseline["size_bytes"]
    report["baseline"] = baseline
    emit("baseline", metrics=baseline)
    last_metrics = baseline
    violations: list[str] = []
    for i, cfg in enumerate(recipe.stages, start=1):
        stage = get_stage(cfg.type)(cfg, i)
        sdir = snap_root / f"{i:02d}-{cfg.type}"
        state.stage_dir = sdir
        emit("stage_start", index=i, total=len(recipe.stages), name=stage.name, type=cfg.type)
        ts = time.perf_counter()
        try:
            result = stage.run(state)
        except CompressError as e:
            e.problems = [f"stages[{i - 1}] ({cfg.type}): {p}" for p in e.problems]
            _write_partial(report, out, last_metrics, f"stage {i} ({cfg.type}) failed: {e}")
            raise
        except Exception as e:
            _write_partial(report, out, last_metrics, f"stage {i} ({cfg.type}) failed: {e}")
            raise StageError(f"stages[{i - 1}] ({cfg.type}): {type(e).__name__}: {e}") from e
        duration = time.perf_counter() - ts
        save_snapshot(state, sdir / "model")
        metrics = measure(state, sdir / "model", baseline)
        entry = {
            "index": i,
            "name": stage.name,
            "type": cfg.type,
            "duration_s": round(duration, 3),
            "metrics": metrics,
            "notes": result.notes,
            "details": result.details,
            "artifacts": result.artifacts,
        }
        v = guard_violations(recipe, metrics, baseline)
        if v:
            entry["guard_violations"] = v
            violations = v
        else:
            violations = []
        report["stages"].append(entry)
        atomic_write_text(sdir / "state.json", json.dumps({"hparams": state.hparams, "entry": entry}, indent=2, default=str))
        last_metrics = metrics
        emit("stage_end", index=i, entry=entry)
    final_dir = out / "model"
    save_snapshot(state, final_dir)
    final = dict(last_metrics)
    final["size_bytes"] = last_metrics["size_bytes"]
    same = getattr(state.runner, "same_runtime_baseline", None)
    if callable(same):
        final["same_runtime_baseline"] = same(state)
    report["final"] = final
    report["hparams"] = state.hparams
    report["edits"] = state.edits.to_json()
    report["guard"] = {"violations": violations, **recipe.guard.model_dump()}
    report["duration_s"] = round(time.perf_counter() - t0, 3)
    write_report(report, out)
    emit("done", report=report)
    if violations:
        raise GuardError(violations)
    return report


def _write_partial(report: dict[str, Any], out: Path, last: dict[str, Any], error: str) -> None:
    from .report import write_report

    if "baseline" not in report:
        return
    report = dict(report, final=last, error=error, incomplete=True)
    with contextlib.suppress(Exception):
        write_report(report, out)
