"""Batch-size search, behind the ``batch_size_find`` stage: double from a start size while a probe
fits, then binary-search between the last fit and the first failure. A probe is a few real
training steps at that batch (through ``training.train``), and the model is restored afterwards:

- on CUDA it fits when no ``torch.cuda.OutOfMemoryError`` is raised (the allocator is emptied
  after each failure) and, with ``max_memory_gb``, the measured peak allocated memory stays under;
- on CPU the memory is *estimated*, because process RSS is a poor gauge there (the allocator keeps
  freed pages, so RSS only grows, and ``tracemalloc`` does not see torch's allocations): bytes of
  every tensor autograd saves for backward (counted through ``torch.autograd.graph.saved_tensors_hooks``,
  each storage once) plus parameters, gradients, optimizer state and the input batch;
- throughput mode times the steps (after one warm-up step) and keeps the smallest batch within a
  tolerance of the best samples/s.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from compress_cli.tuning._restore import preserved

if TYPE_CHECKING:
    import torch
    from torch import nn

    from compress_cli.state import State
    from compress_cli.training import TrainOptions


@dataclass
class Probe:
    """The outcome of one probe: whether ``batch_size`` fits, why not, memory and throughput."""

    batch_size: int
    fits: bool
    reason: str = ""  # why it does not fit
    memory_bytes: int | None = None  # CUDA: measured peak allocated; CPU: estimate
    samples_per_s: float | None = None

    def as_row(self) -> dict[str, Any]:
        """The probe as a report row (memory in MB, samples/s rounded)."""
        return {
            "batch_size": self.batch_size,
            "fits": self.fits,
            "memory_mb": None if self.memory_bytes is None else round(self.memory_bytes / 2**20, 2),
            "samples_per_s": None if self.samples_per_s is None else round(self.samples_per_s, 1),
            **({"reason": self.reason} if self.reason else {}),
        }


def optimizer_state_factor(opts: TrainOptions) -> int:
    """Tensors of parameter size the optimizer keeps (Adam: 2 moments; SGD with momentum: 1)."""
    if opts.optimizer in ("adam", "adamw"):
        return 2
    return 1 if opts.momentum > 0 else 0


def _is_oom(e: BaseException) -> bool:
    import torch

    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def _free_cuda() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def probe_batch(
    model: nn.Module,
    state: State,
    opts: TrainOptions,
    batch_size: int,
    steps: int,
    *,
    limit_bytes: int | None,
    label: str = "batch_size_find",
) -> Probe:
    """Run ``steps`` training steps at ``batch_size`` (full batches, sampled with replacement) and
    restore the model. Never raises for out-of-memory: the probe then does not fit."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from compress_cli.training import train

    device = state.device
    ds = state.data.train_dataset
    g = torch.Generator().manual_seed(state.seed)
    n = batch_size * steps
    sampler = RandomSampler(ds, replacement=True, num_samples=n, generator=g)  # type: ignore[arg-type]
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=state.data.num_workers)
    probe_opts = opts.model_copy(
        update={
            "epochs": 1,
            "max_steps_per_epoch": steps,
            "batch_size": None,
            "scheduler": "none",
            "warmup_epochs": 0.0,
            "early_stopping": None,
        }
    )
    times: list[float] = []
    saved_bytes: list[int] = [0]
    seen: dict[int, int] = {}
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    last = [time.perf_counter()]

    def on_step(step: int, loss: float, opt: Any) -> bool:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now
        return False

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            key = t.untyped_storage().data_ptr()
            size = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. sparse)
            key, size = id(t), t.numel() * t.element_size()
        if key not in seen and key not in param_ptrs:  # parameters are counted once, below
            seen[key] = size
            saved_bytes[0] = max(saved_bytes[0], sum(seen.values()))
        return t

    def reset_seen() -> None:
        seen.clear()

    cuda = device.type == "cuda"
    if cuda:
        _free_cuda()
        torch.cuda.reset_peak_memory_stats(device)
    hooks = contextlib.nullcontext() if cuda else torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    oom = False
    try:
        with preserved(model), hooks:
            last[0] = time.perf_counter()
            train(
                model,
                state,
                probe_opts,
                loader=loader,
                on_step=on_step,
                after_step=reset_seen,
                validate=False,
                distributed=False,
                label=f"{label} bs={batch_size}",
            )
            if cuda:
                torch.cuda.synchronize(device)
    except Exception as e:
        if not _is_oom(e):
            raise
        oom = True  # free the memory outside the handler, once the traceback's frames are gone
    if oom:
        _free_cuda()
        return Probe(batch_size, False, "out of memory")
    rate = None
    if len(times) >= 2:
        rate = batch_size / statistics.median(times[1:])
    elif times:
        rate = batch_size / times[0]
    if cuda:
        mem = int(torch.cuda.max_memory_allocated(device))
        _free_cuda()
    else:
        # weights + gradients + optimizer state (trainable parameters), plus the saved activations
        # (the input batch is among them: the first layer saves it)
        frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
        trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        mem = saved_bytes[0] + frozen + trainable * (2 + optimizer_state_factor(opts))
    if limit_bytes is not None and mem > limit_bytes:
        return Probe(batch_size, False, f"needs {mem / 2**30:.3f} GB > max_memory_gb", mem, rate)
    return Probe(batch_size, True, "", mem, rate)


def search_max_batch(fits: Callable[[int], bool], start: int, cap: int) -> tuple[int | None, str]:
    """Largest batch in [1, cap] for which ``fits`` holds: doubling from ``start``, then binary search.

    Assumes fitting is monotone in the batch size. Returns (size or None, how the search ended).
    """
    start = max(1, min(start, cap))
    if not fits(start):
        hi, lo = start, 0
        while hi > 1:  # shrink until something fits
            if fits(hi // 2):
                lo = hi // 2
                break
            hi //= 2
        if lo == 0:
            return None, "even batch 1 does not fit"
    else:
        lo, hi = start, 0
        while lo < cap:
            nxt = min(lo * 2, cap)
            if not fits(nxt):
                hi = nxt
                break
            lo = nxt
        if hi == 0:
            return lo, "capped" if lo == cap else "fits"
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, f"limit between {lo} and {hi}"


def apply_margin(batch: int, margin: float, multiple_of: int) -> int:
    """``batch`` less the safety margin, rounded down to a multiple of ``multiple_of`` when possible."""
    b = max(1, int(math.floor(batch * (1 - margin))))
    if multiple_of > 1 and b >= multiple_of:
        b -= b % multiple_of
    return b


def pick_throughput(probes: list[Probe], tolerance: float) -> Probe:
    """The smallest fitting batch whose throughput is within ``tolerance`` of the best."""
    ok = [p for p in probes if p.fits and p.samples_per_s]
    best = max(p.samples_per_s or 0.0 for p in ok)
    return min(
        (p for p in ok if (p.samples_per_s or 0.0) >= (1 - tolerance) * best), key=lambda p: p.batch_size
    )
