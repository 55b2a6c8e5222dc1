"""``scheme: auto``: quantize for a deployment target, not a scheme.

Every candidate scheme of the target's runtimes is converted through one function
(:func:`convert_candidate`), then all are measured on the same harness: the task's primary metric
on the evaluation split, latency at the target batch timed *interleaved* with the fp32 model the
stage received (torch eager) in this process (round by round, medians), the checkpoint's size and
the conversion time. The fastest candidate within the accuracy budget wins; a candidate slower than
the fp32 model is flagged and never chosen; when none is faster within budget, the fp32 model stays
as it is (a valid outcome, said so). A candidate that cannot convert is a row with its reason.

The evaluation split is the one the accuracy budget measures on (``budget.selection_split``:
validation, so the choice is not made on the numbers the pipeline reports). With
``max_accuracy_drop`` set, every candidate whose scheme takes it (``Scheme.options``) converts
through the budget's per-layer fallback (``budget.convert_within_budget``: its row lists the layers
kept in float and the steps; a budget not met rejects the candidate, it is no stage violation),
the fp32 candidates convert plainly, and the int8 candidates' SQNR gate is relaxed as for a single
scheme under a budget (``budget.gate_options``).
"""

from __future__ import annotations

import copy
import importlib.util
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress_cli.errors import StageError
from compress_cli.quantization.base import Quantized
from compress_cli.quantization.budget import drop_points, gate_options, selection_split

if TYPE_CHECKING:
    from torch import nn

    from compress_cli.runtime.runners import Runner
    from compress_cli.state import State

#: every runtime ``target.runtimes`` may name, and the candidate schemes of each
RUNTIMES = ("torch", "onnxruntime", "openvino")
#: the accuracy budget of ``scheme: auto`` when ``max_accuracy_drop`` is unset (points)
DEFAULT_BUDGET = 1.0
#: what must be importable for a runtime's candidates
_NEEDS = {"torch": (), "onnxruntime": ("onnxruntime",), "openvino": ("openvino", "nncf")}
#: the row name of the fp32 model the candidates are timed against
FP32 = "fp32 (torch-eager)"

#: a timer: (runners by row name, the batch) -> median latency in seconds by row name
Timer = Callable[[dict[str, Any], Any], dict[str, float]]


def installed_runtimes() -> list[str]:
    """The runtimes whose packages are importable (torch always)."""
    return [r for r in RUNTIMES if all(importlib.util.find_spec(m) is not None for m in _NEEDS[r])]


def missing_runtime(runtime: str) -> str | None:
    """What ``runtime`` lacks (a package name), or None."""
    return next((m for m in _NEEDS[runtime] if importlib.util.find_spec(m) is None), None)


def linear_dominated(model: nn.Module) -> bool:
    """Whether most weights of ``model``'s Linear and conv layers are in Linear layers (then
    int8_dynamic, which quantizes Linear only, is worth a try)."""
    from torch import nn

    lin = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    conv = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)))
    return lin > conv


def candidate_name(scheme: str, precision: str = "f32") -> str:
    """A candidate's row name: the scheme, with a non-default inference precision in brackets
    (``openvino_int8 (bf16)``)."""
    return scheme if precision == "f32" else f"{scheme} ({precision})"


def candidate_schemes(model: nn.Module, runtimes: list[str]) -> list[tuple[str, str, str]]:
    """(scheme, runtime, inference precision) of every candidate for ``runtimes``, in order; the
    openvino schemes also in bf16 where the CPU has bf16 units (OpenVINO's default there: a speed
    the budget may accept, measured rather than assumed)."""
    out: list[tuple[str, str, str]] = []
    for r in runtimes:
        if r == "torch":
            out.append(("int8_static", "torch", "f32"))
            if linear_dominated(model):
                out.append(("int8_dynamic", "torch", "f32"))
        elif r == "onnxruntime":
            out += [("onnxruntime_int8", r, "f32"), ("onnxruntime_fp32", r, "f32")]
        elif r == "openvino":
            from compress_cli.runtime import openvino as ovrt

            out += [("openvino_int8", r, "f32"), ("openvino_fp32", r, "f32")]
            if ovrt.bf16_supported():
                out += [("openvino_int8", r, "bf16"), ("openvino_fp32", r, "bf16")]
    return out


@dataclass
class Candidate:
    """One converted candidate (or why it could not be converted)."""

    scheme: str
    runtime: str
    precision: str = "f32"  # inference_precision (the openvino schemes)
    model: Any = None  # the module the checkpoint stores
    entry: dict[str, Any] | None = None  # its manifest transforms entry
    runner: Any = None
    done: Quantized | None = None
    convert_s: float = 0.0
    size_bytes: int | None = None
    error: str | None = None
    row: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The row name (:func:`candidate_name`)."""
        return candidate_name(self.scheme, self.precision)


def candidate_options(options: Any, scheme: str, precision: str = "f32") -> Any:
    """The stage's ``options`` for candidate ``scheme``: the scheme and ``inference_precision``
    (``precision``) replaced; the SQNR gate relaxed
    under a budget (:func:`~compress_cli.quantization.budget.gate_options`); ``max_accuracy_drop``
    kept only where the scheme takes it (then :func:`compress_cli.quantization.quantize` runs the
    per-layer fallback), so an fp32 candidate converts once."""
    from compress_cli.quantization.schemes import SCHEMES

    opts = gate_options(options).model_copy(update={"scheme": scheme, "inference_precision": precision})
    known = SCHEMES.get(scheme)
    if opts.max_accuracy_drop is not None and (known is None or "max_accuracy_drop" not in known.options):
        opts = opts.model_copy(update={"max_accuracy_drop": None})
    return opts


def convert_candidate(
    state: State, options: Any, scheme: str, runtime: str, label: str, precision: str = "f32"
) -> Candidate:
    """Convert ``state.model`` with ``scheme`` at ``precision`` (``options``: the stage's, scheme
    replaced), leaving
    the state as it was; the one path every candidate takes. Conversion time includes preparing the
    runner and its first call at batch 1 (a compilation, a session). A failure is the candidate's
    ``error``, not an exception."""
    import tempfile

    from compress_cli.quantization import quantize
    from compress_cli.state import save_snapshot

    saved = (state.model, list(state.transforms), state.runner, list(state.edits.items))
    cand = Candidate(scheme, runtime, precision)
    opts = candidate_options(options, scheme, precision)
    t0 = time.perf_counter()
    try:
        done = quantize(state, opts, label)
        runner = state.current_runner()
        runner.prepare()
        runner(state.data.example_input(1))
        cand.convert_s = time.perf_counter() - t0
        cand.model, cand.runner, cand.done = state.model, runner, done
        cand.entry = state.transforms[-1] if len(state.transforms) > len(saved[1]) else None
        with tempfile.TemporaryDirectory(prefix="compress-auto-") as d:
            cand.size_bytes = save_snapshot(state, Path(d))
    except Exception as e:  # a refused or crashed candidate is a row with its reason
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        cand.error = f"{type(e).__name__}: {first[:300]}" if not isinstance(e, StageError) else first[:400]
        cand.convert_s = time.perf_counter() - t0
    finally:
        state.model, state.runner = saved[0], saved[2]
        state.transforms[:] = saved[1]
        state.edits.items[:] = saved[3]
    return cand


#: idle time between two runners' blocks (s): torch's OpenMP workers spin-wait after a parallel
#: region, and a runtime with its own thread pool timed right after them shares the cores with
#: them (measured: OpenVINO at 2 threads on a tiny CNN, 1.10 ms right after torch, 0.10 ms alone)
SETTLE_S = 0.05


def interleaved_latency(
    runners: dict[str, Any], x: Any, threads: int | None, rounds: int = 5, iterations: int = 10
) -> dict[str, float]:
    """Median latency (s) of each runner on ``x``: ``rounds`` rounds, each timing every runner in
    turn for ``iterations`` calls (after one warm-up call per round), median of the rounds' medians.
    Interleaving puts the machine's drifts (other jobs, clocks) on every runner alike."""
    import torch

    from compress_cli.runtime.measure import cpu_threads, time_calls

    per: dict[str, list[float]] = {k: [] for k in runners}
    with cpu_threads(threads), torch.inference_mode():
        for r in runners.values():
            r.prepare()
            r(x)
        for _ in range(rounds):
            for k, r in runners.items():
                time.sleep(SETTLE_S)
                per[k].append(statistics.median(time_calls(r, x, torch.device("cpu"), 1, iterations)))
    return {k: statistics.median(v) for k, v in per.items()}


def fallback_of(c: Candidate) -> dict[str, Any] | None:
    """The per-layer fallback's record of candidate ``c`` (``details["budget"]`` of its conversion:
    steps, layers kept in float, met or not), or None when it converted without one."""
    b = c.done.details.get("budget") if c.done is not None else None
    return b if isinstance(b, dict) else None


def decide(cands: list[Candidate], base: float, budget: float) -> Candidate | None:
    """The fastest of ``cands`` (each with ``row["latency"]`` and ``row["drop"]``) within ``budget``
    and faster than ``base`` (the fp32 model's latency); an int8 candidate slower than the fp32
    candidate of its own runtime is flagged too, and one whose per-layer fallback did not meet the
    budget is rejected with the fallback's verdict. Each candidate's ``row["why"]`` says why it was
    not eligible ("" when it was). None: no candidate is."""
    same_fp32 = {(c.runtime, c.precision): c.row["latency"] for c in cands if c.scheme.endswith("_fp32")}
    eligible = []
    for c in cands:
        why = []
        lat = c.row["latency"]
        if lat >= base:
            why.append(f"slower than fp32 ({lat * 1e3:.3f} ms vs {base * 1e3:.3f} ms)")
        elif not c.scheme.endswith("_fp32") and lat >= same_fp32.get((c.runtime, c.precision), float("inf")):
            why.append(f"slower than {candidate_name(c.runtime + ' fp32', c.precision)}")
        fallback = fallback_of(c)
        if fallback is not None and not fallback.get("met"):
            why.append(
                f"max_accuracy_drop not met by the fallback: {fallback.get('why', '')} "
                f"(max_float_layers {fallback.get('max_float_layers')})"
            )
        elif c.row["drop"] > budget:
            why.append(f"drop {c.row['drop']:.2f} > budget {budget:g}")
        c.row["why"] = "; ".join(why)
        if not why:
            eligible.append(c)
    return min(eligible, key=lambda c: c.row["latency"]) if eligible else None


def convert_all(
    state: State, options: Any, label: str, runtimes: list[str]
) -> tuple[Runner, float, list[Candidate]]:
    """Every candidate of ``runtimes`` converted and scored on the selection split
    (:func:`~compress_cli.quantization.budget.selection_split`) -> (the fp32 model's eager runner,
    its primary metric, the candidates: ``row["score"]`` or ``error``). StageError when none
    converts."""
    import torch

    from compress_cli.runtime.measure import evaluate
    from compress_cli.runtime.runners import EagerRunner

    data, task = state.data, state.data.get_task()
    split = selection_split(state)
    fp32_runner = EagerRunner(copy.deepcopy(state.model).cpu().eval(), torch.device("cpu"))
    ref = float(evaluate(fp32_runner, data.loader(split), task, split=split)[task.primary])
    cands = []
    for scheme, runtime, precision in candidate_schemes(state.model, runtimes):
        state.ctx.listener.on_message(f"quantize auto: {candidate_name(scheme, precision)}")
        cands.append(convert_candidate(state, options, scheme, runtime, label, precision))
    if all(c.error is not None for c in cands):
        raise StageError(
            "scheme auto: no candidate converted (" + "; ".join(f"{c.name}: {c.error}" for c in cands) + ")"
        )
    for c in cands:
        if c.error is not None:
            continue
        try:
            c.row["score"] = float(evaluate(c.runner, data.loader(split), task, split=split)[task.primary])
        except Exception as e:
            c.error = f"evaluation failed: {type(e).__name__}: {str(e).strip()[:200]}"
    return fp32_runner, ref, cands


def choose(
    state: State,
    options: Any,
    label: str,
    *,
    runtimes: list[str],
    batch: int,
    budget: float,
    threads: int | None,
    timer: Timer | None = None,
) -> Quantized:
    """Convert every candidate, measure all on one harness, keep the fastest within ``budget``
    (points of the primary metric, on the selection split) that is faster than the fp32 model;
    leave it in the state. The chosen candidate's own violations (none from the budget: a
    candidate that did not meet it is not chosen) are the stage's.
    ``timer`` replaces :func:`interleaved_latency` (tests make the timings deterministic)."""
    data, task = state.data, state.data.get_task()
    fp32_runner, ref, cands = convert_all(state, options, label, runtimes)
    ok = [c for c in cands if c.error is None]
    x = data.example_input(batch)
    runners = {FP32: fp32_runner, **{c.name: c.runner for c in ok}}
    lat = (timer or (lambda rs, xb: interleaved_latency(rs, xb, threads)))(runners, x)
    base = lat[FP32]
    for c in ok:
        c.row["drop"] = drop_points(task, ref, c.row["score"])
        c.row["latency"] = lat[c.name]
    winner = decide(ok, base, budget)
    rows = [_row(FP32, "torch", ref, 0.0, base, batch, None, 0.0, "the model received (baseline)")]
    for c in cands:
        if c.error is not None:
            rows.append(
                _row(
                    c.name,
                    c.runtime,
                    None,
                    None,
                    None,
                    batch,
                    c.size_bytes,
                    c.convert_s,
                    f"failed: {c.error}",
                )
            )
            continue
        status = "chosen" if c is winner else (c.row["why"] or "slower than the chosen one")
        row = _row(
            c.name,
            c.runtime,
            c.row["score"],
            c.row["drop"],
            c.row["latency"],
            batch,
            c.size_bytes,
            c.convert_s,
            status,
        )
        fallback = fallback_of(c)
        if fallback is not None:
            row["float_layers"] = list(fallback.get("float_layers") or [])
            row["fallback_steps"] = len(fallback.get("steps") or [])
        rows.append(row)
    for c in cands:  # the losers' deployment files go
        if c is not winner and c.done is not None:
            for p in c.done.artifacts:
                Path(p).unlink(missing_ok=True)
    details: dict[str, Any] = {
        "scheme": "auto",
        "target": {"batch": batch, "runtimes": runtimes, "threads": threads},
        "max_accuracy_drop": budget,
        "primary": task.primary,
        "split": selection_split(state),
        "candidates": rows,
    }
    if winner is None:
        details["chosen"] = None
        return Quantized(
            notes=f"auto: no candidate is faster than fp32 within {budget:g} points: the fp32 model stays",
            details=details,
        )
    state.model, state.runner = winner.model, winner.runner
    if winner.entry is not None:
        state.transforms.append(winner.entry)
    state.edits.record(label, op="quantize", scheme=winner.scheme, auto=True)
    assert winner.done is not None
    chosen = dict(winner.done.details)
    fallback = chosen.pop("budget", None)
    details.update(chosen=winner.name, runtime=winner.runtime)
    details.update({f"chosen_{k}": v for k, v in chosen.items()})
    notes = (
        f"auto -> {winner.name} ({winner.runtime}): {base / winner.row['latency']:.2f}x fp32 "
        f"at batch {batch}, "
        f"drop {winner.row['drop']:.2f} on {details['split']} (budget {budget:g}); {len(cands)} candidates"
    )
    if fallback is not None:  # the chosen candidate's fallback steps, as report.md lists a fixed scheme's
        details["budget"] = fallback
        notes += f"; float: {', '.join(fallback.get('float_layers') or []) or 'none'}"
    return Quantized(
        notes=notes, details=details, artifacts=winner.done.artifacts, violations=winner.done.violations
    )


def _row(
    scheme: str,
    runtime: str,
    score: float | None,
    drop: float | None,
    latency: float | None,
    batch: int,
    size: int | None,
    convert_s: float,
    status: str,
) -> dict[str, Any]:
    return {
        "scheme": scheme,
        "runtime": runtime,
        "score": None if score is None else round(score, 6),
        "drop": drop,
        "latency_ms": None if latency is None else round(latency * 1e3, 4),
        "throughput": None if latency is None else round(batch / latency, 1),
        "size_bytes": size,
        "convert_s": round(convert_s, 2),
        "status": status,
    }
