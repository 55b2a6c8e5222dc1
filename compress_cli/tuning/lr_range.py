"""LR range test (Smith 2015, "Cyclical learning rates"; fastai's and Lightning's lr finder),
behind the ``lr_find`` stage.

The lr grows from ``min_lr`` to ``max_lr`` over N optimizer steps (exponentially or linearly) of
the one training loop (``training.train``), the batch loss is smoothed with a bias-corrected
exponential moving average, and the sweep stops when the smoothed loss exceeds ``diverge`` times
its minimum. The suggestion is the lr at the steepest descent of the smoothed loss against
log(lr), or the lr of the minimum divided by a factor. A curve that is flat (it never falls by
``min_improvement`` of its starting value), noisier than its own descent, or too short is
reported as unreliable instead of guessed from. The stage runs the sweep inside
:func:`~compress_cli.tuning.preserved`, so only its finding is left in ``state.hparams``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from compress_cli.state import State
    from compress_cli.training import TrainOptions


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
    """The suggested lr (or None with the reason the curve does not support one)."""

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
    """One range-test sweep: the lr, raw and smoothed loss of every step, and why it stopped."""

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
    """At most ``n`` evenly spaced entries of ``values``, first and last included (report curves)."""
    if len(values) <= n:
        return list(values)
    idx = [round(i * (len(values) - 1) / (n - 1)) for i in range(n)]
    return [values[i] for i in idx]
