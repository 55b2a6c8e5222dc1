"""Getting a run ready and keeping it healthy between stages: device, seeds, the output directory,
the loaded :class:`~compress_cli.state.State`, the up-front stage checks, memory, finite weights."""

from __future__ import annotations

import contextlib
import copy
import os
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress_cli.engine.lock import LOCK_NAME
from compress_cli.errors import CompressError, StageError, UsageError
from compress_cli.events import RunListener
from compress_cli.tracking import TRACKING_FILE

if TYPE_CHECKING:
    import torch
    from torch import nn

    from compress_cli.config.recipe import Recipe
    from compress_cli.stages.base import Stage, StageConfig
    from compress_cli.state import State, StopSource


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else is checked to exist here, before
    anything loads (a UsageError naming the ``device`` key and what this machine has)."""
    import torch

    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"device: {spec!r}: CUDA was requested but no CUDA device is available here "
                "(set device: cpu or auto, or --device cpu)"
            )
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            have = "cuda:0" if n == 1 else f"cuda:0 to cuda:{n - 1}"
            raise UsageError(
                f"device: {spec!r}: this machine has {n} CUDA device(s) ({have}, as CUDA_VISIBLE_DEVICES "
                f"numbers them); set device: cuda:{n - 1}, cuda or auto"
            )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device: {spec!r}: MPS is not available here (set device: cpu or auto)")
    return dev


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; ``deterministic`` also asks torch for deterministic kernels."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


#: what a run writes in its output directory (a run killed before its first snapshot leaves some)
RUN_FILES = frozenset(
    {"recipe.yaml", "report.json", "report.md", "report.png", "model", "stages", LOCK_NAME, TRACKING_FILE}
)


def _contents(out: Path) -> list[Path]:
    """What ``out`` holds besides the lock file (which a live run keeps and ``--force`` never deletes)."""
    return [p for p in out.iterdir() if p.name != LOCK_NAME] if out.is_dir() else []


def only_run_files(out: Path) -> bool:
    """Whether ``out`` holds nothing but what a run of this tool writes there."""
    return all(p.name in RUN_FILES for p in _contents(out))


def check_output(out: Path, force: bool) -> None:
    """Refuse (UsageError) an output that is a file, not empty without ``force``, or not writable."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out}: exists and is not a directory")
    if _contents(out) and not force:
        raise UsageError(
            f"output {out}: exists and is not empty (use --force to replace it, or --output DIR)"
        )
    parent = next((p for p in [out, *out.parents] if p.exists()), None)
    if parent is not None and not os.access(parent, os.W_OK):
        raise UsageError(f"output {out}: {parent} is not writable")


def prepare_output(out: Path, force: bool) -> None:
    """An empty, writable output directory (a non-empty one is emptied when ``force``). The lock file
    stays: the caller holds it, and a new file under that name would be a lock nobody holds."""
    check_output(out, force)
    for p in _contents(out):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"output {out}: not writable ({e.strerror or e})") from None


#: bytes of weights above which the frozen original model waits in a file instead of in memory
ORIGINAL_IN_MEMORY_MAX = 1 << 30


def build_state(
    recipe: Recipe,
    device: torch.device,
    out: Path,
    listener: RunListener | None = None,
    stop: StopSource | None = None,
) -> State:
    """Load the recipe's data and model onto ``device`` and wrap them in a State whose context
    writes to ``out``, reports to ``listener`` and stops when ``stop`` says so (default: a
    StopController without a time budget). Bad model/data fail here, before anything is written."""
    from compress_cli.config.recipe import ModelConfig
    from compress_cli.engine.signals import StopController
    from compress_cli.engine.stage_run import run_stage
    from compress_cli.sources.data import build_data
    from compress_cli.sources.hints import num_classes_hint
    from compress_cli.sources.models import load_model
    from compress_cli.state import RunContext, State
    from compress_cli.tasks import Reference, build_task

    seed_everything(recipe.seed, recipe.deterministic)
    data = build_data(recipe.data, recipe.seed, recipe.model.input_shape, model_source=recipe.model.source)
    data.task = task = build_task(recipe.task, data.num_classes if data.labelled else None)
    model, spec = load_model(recipe.model)
    data.check_model(model, lambda m, n: num_classes_hint(recipe.model, recipe.data, m, n))
    model.to(device).eval()

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
    ctx = RunContext(
        output_dir=out,
        stop=stop if stop is not None else StopController(),
        run_stage=run_stage,
        listener=listener if listener is not None else RunListener(),
    )
    state = State(
        model=model,
        original=original,
        data=data,
        device=device,
        recipe=recipe,
        model_spec=ModelConfig(source=spec["source"], kwargs=spec.get("kwargs", {})),
        ctx=ctx,
        seed=recipe.seed,
    )
    if task.needs_reference:
        task.reference = Reference(state.original_model, device, task)
    if folder is not None:
        import weakref

        weakref.finalize(state, shutil.rmtree, folder, ignore_errors=True)  # goes with the run's state
    return state


def preflight(
    state: State, configs: Sequence[StageConfig] | None = None, where: str = "stages", skip: int = 0
) -> list[str]:
    """Every stage's (and nested stage's) :meth:`Stage.preflight` against the loaded model, before
    anything runs: the located refusals, one line each (empty: all stages can apply). The first
    ``skip`` stages (already done, on --resume) are not checked. Also checked: that the manifest
    can describe the loaded model (the run saves it after every stage) and every module a stage
    says it may put into the model (:meth:`Stage.new_modules`). After a stage that swaps in
    another model (:meth:`Stage.replaces_model`) the later stages are not checked: they would be
    checked against the wrong model."""
    from compress_cli.stages.registry import get_stage

    problems = saveable_problems(state) if configs is None else []
    for i, cfg in enumerate(state.recipe.stages if configs is None else configs, start=1):
        cls = get_stage(cfg.type)
        if i > skip:
            stage = cls(cfg, i)
            found: list[str] = []
            try:
                stage.preflight(state)
                found = _new_module_problems(stage, state)
            except CompressError as e:
                found = e.problems
            problems += [f"{where}[{i - 1}] ({cfg.type}): {p}" for p in found]
            for field, children in cls.children(cfg):
                problems += preflight(state, children, f"{where}[{i - 1}].{field}")
        if cls.replaces_model(cfg):
            break
    return problems


def _new_module_problems(stage: Stage[Any], state: State) -> list[str]:
    """What the manifest could not record of the modules ``stage`` may put into the model."""
    from compress_cli.checkpoint.architecture import describe_problem

    source = state.model_spec.source
    found = (describe_problem(m, path, source) for path, m in stage.new_modules(state))
    return [p for p in found if p]


def saveable_problems(state: State) -> list[str]:
    """Why the loaded model could not be saved as a model directory (its architecture differs
    from what its model source builds in a way the manifest cannot describe, e.g. a pickled
    module of another architecture), one located line each; empty when it can be. The run saves
    a snapshot after every stage: this refuses up front what would fail after the first one.
    The source's architecture is built on the meta device (no weights allocated) where it can be."""
    import torch

    from compress_cli.checkpoint import architecture_diff
    from compress_cli.sources.models import build_from_source

    spec = state.model_spec.model_dump(mode="json")
    try:
        try:
            with torch.device("meta"):
                base = build_from_source(spec)
        except CompressError:
            raise
        except Exception:  # a constructor that needs real tensors
            base = build_from_source(spec)
        architecture_diff(base, state.model, source=spec["source"])
    except CompressError as e:
        return [f"model: cannot be saved as a model directory: {p}" for p in e.problems]
    return []


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
    """StageError when a floating-point weight or buffer of the model holds NaN or inf."""
    import torch

    bad = [
        n
        for n, t in state.model.state_dict().items()
        if t.is_floating_point() and not torch.isfinite(t).all()
    ]
    if bad:
        more = " ..." if len(bad) > 3 else ""
        raise StageError(
            f"weights contain NaN/inf after this stage ({', '.join(bad[:3])}{more}); "
            "the previous stage's snapshot is kept"
        )
