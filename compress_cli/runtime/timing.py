"""Paired timing: two runners timed interleaved in the same window, so their ratio does not carry
whatever changed on the machine between two measurements taken minutes apart.

:func:`time_pair` runs ABAB rounds (each round a fixed number of calls of one runner at one batch
size, the order swapped every round to cancel drift) and returns each side's median/p90 per call
and the median of the per-round ratios with a seeded bootstrap 95 % interval. :func:`paired_latency`
does that at every latency batch size, judges each result (:func:`instability`) and re-measures an
unstable one within a bounded time before reporting it as ``unstable`` with the reason.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from compress_cli.config.recipe import LatencyConfig

#: per-round ratios whose p90/p50 is above this are too spread to trust
MAX_SPREAD = 1.5
#: a 95 % interval wider than ± this fraction of the median is too wide to trust
MAX_HALF_WIDTH = 0.2
#: CPU cores other processes may use beyond the idle ones before the machine counts as oversubscribed
CONTENTION_SLACK = 0.5
BOOTSTRAP_SAMPLES = 2000


@dataclass
class PairedTiming:
    """One paired measurement at one batch size: side A (the reference, e.g. the original model)
    against side B (the model under test); ``ratio`` = A's time / B's time (a speedup of B)."""

    batch: int
    rounds: int
    calls: int
    a_ms_p50: float
    a_ms_p90: float
    b_ms_p50: float
    b_ms_p90: float
    ratio: float
    ci: tuple[float, float]
    spread: float  # p90/p50 of the per-round ratios
    others_cpu: float | None  # CPU cores other processes used meanwhile (None: not measurable here)
    threads: int
    cores: int
    seconds: float
    attempts: int = 1
    unstable: str | None = None  # why the number is not to be trusted (None: stable)
    round_ratios: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The report form (rounded; the raw per-round ratios left out)."""
        d = asdict(self)
        d.pop("round_ratios")
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = round(v, 4)
        d["ci"] = [round(self.ci[0], 4), round(self.ci[1], 4)]
        return d


def bootstrap_median_ci(
    values: list[float], seed: int = 0, samples: int = BOOTSTRAP_SAMPLES
) -> tuple[float, float]:
    """Seeded percentile-bootstrap 95 % interval of the median of ``values``."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    med = np.median(v[rng.integers(0, len(v), size=(samples, len(v)))], axis=1)
    lo, hi = np.percentile(med, [2.5, 97.5])
    return float(lo), float(hi)


def _quantile(values: list[float], q: int) -> float:
    """The ``q``-th decile of ``values`` (inclusive method; the value itself for one value)."""
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[q - 1]


class CpuWatch:
    """CPU time the rest of the machine used while it ran (Linux ``/proc``): all cores' busy time
    minus this process's, in cores. ``others()`` is None where ``/proc`` is not readable."""

    def __init__(self) -> None:
        self.start = self._read()
        self.t0 = time.perf_counter()

    @staticmethod
    def _read() -> tuple[float, float] | None:
        try:
            with open("/proc/stat") as f:
                cpu = [float(x) for x in f.readline().split()[1:]]
            with open("/proc/self/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        busy = sum(cpu) - cpu[3] - (cpu[4] if len(cpu) > 4 else 0.0)  # minus idle and iowait
        mine = float(fields[11]) + float(fields[12])  # utime + stime, all threads
        return busy / tick, mine / tick

    def others(self) -> float | None:
        """Cores the other processes kept busy on average since construction."""
        end = self._read()
        elapsed = time.perf_counter() - self.t0
        if self.start is None or end is None or elapsed <= 0:
            return None
        return max(0.0, ((end[0] - self.start[0]) - (end[1] - self.start[1])) / elapsed)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity; the machine's count elsewhere)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def time_pair(
    a: Callable[[Any], Any],
    b: Callable[[Any], Any],
    x: Any,
    *,
    batch: int,
    rounds: int,
    calls: int,
    warmup: int = 1,
    threads: int = 1,
    device: torch.device | None = None,
    seed: int = 0,
) -> PairedTiming:
    """``a`` and ``b`` called on ``x`` interleaved: ``rounds`` rounds of ``calls`` calls each, A
    first in even rounds and B first in odd ones, after ``warmup`` calls of each. Each round's
    ratio is A's mean call time / B's; the result is the median ratio, its bootstrap interval, each
    side's median/p90 per call and the spread of the rounds (judged by :func:`instability`)."""
    import torch

    from compress_cli.runtime.measure import time_calls

    dev = device if device is not None else torch.device("cpu")

    def _round(fn: Callable[[Any], Any]) -> list[float]:
        return time_calls(fn, x, dev, 0, calls)

    for _ in range(warmup):
        a(x)
        b(x)
    watch = CpuWatch()
    t0 = time.perf_counter()
    ta: list[float] = []
    tb: list[float] = []
    ratios = []
    for r in range(rounds):
        if r % 2 == 0:
            ra = _round(a)
            rb = _round(b)
        else:
            rb = _round(b)
            ra = _round(a)
        ta += ra
        tb += rb
        ratios.append(sum(ra) / max(sum(rb), 1e-12))
    ratio = statistics.median(ratios)
    return PairedTiming(
        batch=batch,
        rounds=rounds,
        calls=calls,
        a_ms_p50=statistics.median(ta) * 1e3,
        a_ms_p90=_quantile(ta, 9) * 1e3,
        b_ms_p50=statistics.median(tb) * 1e3,
        b_ms_p90=_quantile(tb, 9) * 1e3,
        ratio=ratio,
        ci=bootstrap_median_ci(ratios, seed),
        spread=_quantile(ratios, 9) / ratio if ratio > 0 else float("inf"),
        others_cpu=watch.others(),
        threads=threads,
        cores=usable_cores(),
        seconds=time.perf_counter() - t0,
        round_ratios=ratios,
    )


def instability(p: PairedTiming) -> str | None:
    """Why ``p`` is not to be trusted, or None: rounds too spread (p90/p50 of the per-round ratios
    over 1.5), the 95 % interval wider than ±20 % of the median, or the machine oversubscribed
    (this measurement's threads plus the cores other processes kept busy meanwhile exceed the
    cores by more than half a core: the load average over the measurement, less its own part)."""
    reasons = []
    if p.spread > MAX_SPREAD:
        reasons.append(
            f"rounds spread: p90/p50 of the per-round ratios is {p.spread:.2f} (over {MAX_SPREAD})"
        )
    half = (p.ci[1] - p.ci[0]) / 2 / p.ratio if p.ratio > 0 else float("inf")
    if half > MAX_HALF_WIDTH:
        reasons.append(
            f"95% interval {p.ci[0]:.2f}-{p.ci[1]:.2f} is ±{half * 100:.0f}% of the median "
            f"(over ±{MAX_HALF_WIDTH * 100:.0f}%)"
        )
    if p.others_cpu is not None and p.threads + p.others_cpu > p.cores + CONTENTION_SLACK:
        reasons.append(
            f"machine busy: other processes kept {p.others_cpu:.1f} of {p.cores} cores busy "
            f"while this measurement ran {p.threads} thread(s)"
        )
    return "; ".join(reasons) or None


def measure_pair(
    a: Callable[[Any], Any],
    b: Callable[[Any], Any],
    x: Any,
    *,
    budget_s: float,
    calls: int,
    **kw: Any,
) -> PairedTiming:
    """:func:`time_pair`, repeated while the result is unstable and the next attempt fits in what is
    left of ``budget_s`` seconds; each repeat doubles the calls per round (longer rounds average
    out the jitter of short calls). Returns the first stable attempt, else the one with the
    narrowest interval, marked ``unstable`` with the reason."""
    t0 = time.perf_counter()
    best: PairedTiming | None = None
    attempts = 0
    while True:
        attempts += 1
        warmup = kw.pop("warmup", 1) if attempts == 1 else 1
        p = time_pair(a, b, x, calls=calls, warmup=warmup, **kw)
        p.unstable = instability(p)
        if best is None or p.unstable is None or _width(p) < _width(best):
            best = p
        elapsed = time.perf_counter() - t0
        calls *= 2
        if p.unstable is None or elapsed + 2 * p.seconds > budget_s:
            break
    best.attempts = attempts
    best.seconds = time.perf_counter() - t0
    return best


def _width(p: PairedTiming) -> float:
    return (p.ci[1] - p.ci[0]) / p.ratio if p.ratio > 0 else float("inf")


def paired_latency(
    reference: Any, runner: Any, example: Callable[[int], Any], cfg: LatencyConfig, seed: int = 0
) -> list[PairedTiming]:
    """``reference`` (A, e.g. the original model's runner) and ``runner`` (B) timed paired at every
    batch size of ``cfg`` (``example(n)``: the model inputs of ``n`` samples; a tensor, tuple or
    dict), with ``cfg``'s threads, warm-up, rounds and re-measuring budget (``remeasure_s``, shared
    by the batch sizes); ``iterations`` calls per side in all, split over the rounds."""
    import torch

    from compress_cli._utils.batches import to_device
    from compress_cli.runtime.measure import cpu_threads

    reference.prepare()
    runner.prepare()
    out = []
    deadline = time.perf_counter() + cfg.remeasure_s  # one re-measuring budget for all batch sizes
    with cpu_threads(cfg.threads), torch.inference_mode():
        threads = torch.get_num_threads()
        for bs in cfg.batch_sizes:
            xa = to_device(example(bs), reference.input_device())
            xb = (
                xa
                if runner.input_device() == reference.input_device()
                else to_device(xa, runner.input_device())
            )
            both = _SameInput(reference, xa, runner, xb)
            out.append(
                measure_pair(
                    both.a,
                    both.b,
                    None,
                    budget_s=max(0.0, deadline - time.perf_counter()),
                    batch=bs,
                    rounds=cfg.rounds,
                    calls=max(1, cfg.iterations // cfg.rounds),
                    warmup=max(1, cfg.warmup),
                    threads=threads,
                    device=runner.input_device(),
                    seed=seed,
                )
            )
    return out


class _SameInput:
    """Two runners each bound to its input (the same batch, on each runner's device)."""

    def __init__(self, ra: Any, xa: Any, rb: Any, xb: Any):
        self.ra, self.xa, self.rb, self.xb = ra, xa, rb, xb

    def a(self, _: Any) -> Any:
        """Call the reference runner."""
        return self.ra(self.xa)

    def b(self, _: Any) -> Any:
        """Call the runner under test."""
        return self.rb(self.xb)


def speedup_fields(pairs: list[PairedTiming]) -> dict[str, Any]:
    """The Metrics fields of a paired measurement: ``speedup`` (and its interval) at the first batch
    size, ``throughput_ratio`` at the last, every batch's numbers under ``paired``, and ``unstable``:
    the reasons, batch by batch, or None when every batch's measurement is stable."""
    first, last = pairs[0], pairs[-1]
    unstable = [f"batch {p.batch}: {p.unstable}" for p in pairs if p.unstable]
    out: dict[str, Any] = {
        "speedup": first.ratio,
        "speedup_ci": [round(first.ci[0], 4), round(first.ci[1], 4)],
        "throughput_ratio": last.ratio,
        "paired": [p.to_dict() for p in pairs],
        "unstable": " | ".join(unstable) or None,
    }
    return out
