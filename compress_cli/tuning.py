"""Algorithms behind the ``lr_find`` and ``batch_size_find`` stages (plain functions, no stage code).

Both are measurements that run real training steps through ``training.train`` (the one loop) and
then put the model back exactly as it was (weights, buffers such as batch-norm statistics, train/eval
mode, and the random number generators), so the stages leave only their findings in
``state.hparams``.

LR range test (Smith 2015, "Cyclical learning rates"; fastai's and Lightning's lr finder): the lr
grows from ``min_lr`` to ``max_lr`` over N optimizer steps (exponentially or linearly), the batch
loss is smoothed with a bias-corrected exponential moving average, and the sweep stops when the
smoothed loss exceeds ``diverge`` times its minimum. The suggestion is the lr at the steepest
descent of the smoothed loss against log(lr), or the lr of the minimum divided by a factor. A curve
that is flat (it never falls by ``min_improvement`` of its starting value), noisier than its own
descent, or too short is reported as unreliable instead of guessed from.

Batch-size search: double from a start size while a probe fits, then binary-search between the
last fit and the first failure. A probe is a few real training steps at that batch:

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
import random
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from compress_cli.state import State
    from compress_cli.training import TrainOptions


# --------------------------------------------------------------------------- restoring
@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Restore ``model``'s parameters, buffers, train/eval mode, gradients and every RNG afterwards."""
    import numpy as np
    import torch

    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    modes = {name: m.training for name, m in model.named_modules()}
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = (
        [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    )
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                model.load_state_dict(saved)
            for name, m in model.named_modules():
                m.training = modes.get(name, m.training)
            for p in model.parameters():
                p.grad = None
            random.setstate(py_state)
            np.random.set_state(np_state)


# --------------------------------------------------------------------------- lr range test
def lr_schedule(min_lr: float, max_lr: float, steps: int, mode: str = "exponential") -> list[float]:
    """The lr of each of ``steps`` sweep steps, from ``min_lr`` to ``max_lr`` inclusive."""
    if steps < 2:
        return [min_lr]
    if mode == "linear":
        return [min_lr + (max_lr - min_lr) * i / (steps - 1) for i in range(steps)]
    ratio = max_lr / min_lr
    return [min_lr * ratio ** (i / (steps - 1)) for i in range(steps)]


def smooth(losses: list[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average (beta = 0: the raw losses)."""
    out, avg = [], 0.0
    for i, v in enumerate(losses, start=1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i) if beta > 0 else v)
    return out


@dataclass
class LrSuggestion:
    lr: float | None  # None: no reliable suggestion
    reason: str  # why it is (un)reliable, one line
    index: int | None = None  # position in the curve
    info: dict[str, Any] = field(default_factory=dict)


def suggest_lr(
    lrs: list[float],
    losses: list[float],
    smoothed: list[float],
    *,
    method: str = "steepest",
    factor: float = 10.0,
    skip_start: int = 10,
    skip_end: int = 1,
    min_improvement: float = 0.05,
    min_points: int = 10,
) -> LrSuggestion:
    """Pick an lr from a range-test curve, or say why the curve does not support one.

    Unreliable when: fewer than ``min_points`` points remain after skipping the first
    ``skip_start`` and last ``skip_end``; the smoothed loss never falls ``min_improvement`` (a
    fraction) below its first value (flat); the raw losses scatter from batch to batch by more
    than the whole descent (noisy: a robust standard deviation from successive differences of the raw
    losses up to the minimum); or the smoothed loss has no descending stretch.
    """
    import numpy as np

    n = len(smoothed)
    lo, hi = min(skip_start, max(0, n - min_points)), n - skip_end
    if hi - lo < min_points:
        return LrSuggestion(
            None,
            f"only {n} point(s) before the sweep stopped (need {min_points + skip_end + 1}); "
            "lower min_lr or raise steps",
        )
    s = np.asarray(smoothed[lo:hi], dtype=np.float64)
    raw = np.asarray(losses[lo:hi], dtype=np.float64)
    x = np.log10(np.asarray(lrs[lo:hi], dtype=np.float64))
    if not np.all(np.isfinite(s)):
        return LrSuggestion(None, "the loss is not finite inside the usable range")
    start, i_min = float(s[0]), int(np.argmin(s))
    drop = start - float(s[i_min])
    rel_drop = drop / abs(start) if start else 0.0
    # batch-to-batch scatter of the raw loss up to the minimum, from successive differences (robust,
    # and blind to the trend that a smoothed-vs-raw residual would mistake for noise)
    desc = raw[: i_min + 1]
    noise = float(np.median(np.abs(np.diff(desc))) / (0.6745 * math.sqrt(2))) if len(desc) > 2 else 0.0
    info = {
        "relative_drop": round(rel_drop, 4),
        "noise_to_drop": round(noise / drop, 4) if drop > 0 else None,
    }
    if rel_drop < min_improvement:
        return LrSuggestion(
            None,
            f"the curve is flat: the smoothed loss fell only {rel_drop * 100:.1f}% "
            f"(< {min_improvement * 100:.0f}%); the model may already be trained, "
            "or max_lr is too low",
            info=info,
        )
    if noise > drop:
        return LrSuggestion(
            None,
            f"the curve is noisy: batch losses scatter by {noise:.3g} from step to "
            f"step, more than the whole descent {drop:.3g} (raise batch_size or steps)",
            info=info,
        )
    if method == "min_div":
        i = lo + i_min
        lr = lrs[i] / factor
        return LrSuggestion(
            lr, f"minimum of the smoothed loss at lr {lrs[i]:.3g}, divided by {factor:g}", i, info
        )
    grad = np.gradient(s, x) if len(np.unique(x)) == len(x) else np.gradient(s)
    j = int(np.argmin(grad[: i_min + 1])) if i_min > 0 else int(np.argmin(grad))
    if grad[j] >= 0:
        return LrSuggestion(None, "the smoothed loss never descends", info=info)
    info["slope"] = round(float(grad[j]), 6)
    return LrSuggestion(lrs[lo + j], "steepest descent of the smoothed loss", lo + j, info)


@dataclass
class LrSweep:
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    stop_reason: str  # "completed" | "diverged"


def run_lr_sweep(
    model: nn.Module,
    state: State,
    opts: TrainOptions,
    schedule: list[float],
    *,
    beta: float,
    diverge: float,
    label: str = "lr_find",
) -> LrSweep:
    """Train ``model`` for ``len(schedule)`` steps with the lr following ``schedule`` (through
    ``training.train``'s ``on_step`` hook), recording each step's loss. Does not restore the model."""
    from compress_cli.training import train

    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    avg = 0.0
    best = math.inf
    reason = ["completed"]

    def on_step(step: int, loss: float, opt: Any) -> bool:
        nonlocal avg, best
        lrs.append(schedule[step])
        losses.append(loss)
        if not math.isfinite(loss):
            smoothed.append(math.inf)
            reason[0] = "diverged"
            return True
        avg = beta * avg + (1 - beta) * loss
        s = avg / (1 - beta ** len(losses)) if beta > 0 else loss
        smoothed.append(s)
        best = min(best, s)
        if len(losses) > 1 and s > diverge * best:
            reason[0] = "diverged"
            return True
        if step + 1 >= len(schedule):
            return True
        for g in opt.param_groups:
            g["lr"] = schedule[step + 1]
        return False

    train(model, state, opts, on_step=on_step, validate=False, distributed=False, label=label)
    return LrSweep(lrs, losses, smoothed, reason[0])


def plot_lr_curve(path: Any, sweep: LrSweep, suggestion: LrSuggestion, log_x: bool = True) -> None:
    """Loss (raw and smoothed) against lr, the suggestion marked; written as a PNG (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    finite = [
        (lr, raw, s)
        for lr, raw, s in zip(sweep.lrs, sweep.losses, sweep.smoothed, strict=True)
        if math.isfinite(raw) and math.isfinite(s)
    ]
    if finite:
        lrs, raws, ss = zip(*finite, strict=True)
        ax.plot(lrs, raws, color="0.75", linewidth=0.8, label="batch loss")
        ax.plot(lrs, ss, color="C0", linewidth=1.8, label="smoothed")
        top = min(max(raws), 3 * max(min(ss), 1e-12) + (ss[0] - min(ss)) * 1.5) if ss else None
        if top is not None and math.isfinite(top) and top > min(raws):
            ax.set_ylim(min(raws) * 0.95, top)
    if log_x:
        ax.set_xscale("log")
    if suggestion.lr is not None:
        ax.axvline(suggestion.lr, color="C3", linestyle="--", label=f"suggested {suggestion.lr:.3g}")
        ax.set_title("lr range test")
    else:
        ax.set_title("lr range test: no reliable suggestion")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path))


def downsample(values: list[float], n: int = 100) -> list[float]:
    if len(values) <= n:
        return list(values)
    idx = [round(i * (len(values) - 1) / (n - 1)) for i in range(n)]
    return [values[i] for i in idx]


# --------------------------------------------------------------------------- batch size
@dataclass
class Probe:
    batch_size: int
    fits: bool
    reason: str = ""  # why it does not fit
    memory_bytes: int | None = None  # CUDA: measured peak allocated; CPU: estimate
    samples_per_s: float | None = None

    def as_row(self) -> dict[str, Any]:
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
    sampler = RandomSampler(ds, replacement=True, num_samples=batch_size * steps, generator=g)  # type: ignore[arg-type]
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
