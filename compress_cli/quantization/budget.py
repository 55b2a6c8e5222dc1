"""An accuracy budget for the int8 schemes: quantize, measure, and return the most sensitive layers
to floating point one at a time until the drop fits (``max_accuracy_drop``, ``max_float_layers``).

:func:`convert_within_budget` is the one entry point: the ``quantize`` stage calls it instead of
the handler's ``convert`` when the budget is set (any scheme whose handler honours ``exclude``).

* The drop is measured on the **validation** split (the split the pipeline does not report on, so
  the loop does not select on the test numbers), against the stage's input model run the same way,
  in points of the task's primary metric: top-1 percentage points for classification, the metric's
  own units for other tasks (the units of ``guard.max_accuracy_drop`` / ``guard.max_metric_drop``).
  ``budget_batches`` caps the batches evaluated per step; the pipeline then measures the kept
  result on its own (full) split as for every stage.
* Layers are ranked once, on the fp32 model, by the **output SQNR when that layer alone is
  fake-quantized** (weights per output channel, symmetric int8; its floating-point input per
  tensor, affine uint8 over the calibration range): one eager forward per layer and batch, no
  conversion or retrace per layer. It measures what each layer's quantization does to the output
  (an early layer's error that later layers amplify counts, a local error that does not matter does
  not), which the per-layer local SQNR misses; measuring "the gain when it alone stays float"
  would need one conversion per layer. It follows the schemes' arithmetic only approximately
  (their observers, fusions and kernels differ), which is why every step is re-measured.
* The SQNR gate (``min_sqnr_db``) is 0 unless the recipe sets it (:func:`gate_options`): the
  budget is the gate, and a step it would refuse is one the fallback may recover.
* Whatever happens, the best result found (smallest drop; on ties the fewest float layers) is what
  the state keeps: the pipeline saves it like any stage result. When the budget is not met the
  stage reports a violation, handled as a guard violation after the stage (the stage's
  ``on_violation``, else the guard's: by default the run fails and keeps that result in the
  stage's snapshot).
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from compress_cli.errors import StageError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from compress_cli.quantization.base import Quantized, SchemeHandler
    from compress_cli.runtime.runners import Runner
    from compress_cli.state import State

#: calibration batches the sensitivity ranking runs over (each costs one forward per layer)
SENSITIVITY_BATCHES = 4
#: calls timed per step for the rough latency in the step table (batch 1, after 3 warm-up calls)
STEP_LATENCY_CALLS = 20
#: layers listed with their sensitivity in the report details
SENSITIVITY_LISTED = 20


@dataclass
class _Kept:
    """One converted result: what it left in the state, and how it measured."""

    model: nn.Module
    transforms: list[dict[str, Any]]
    runner: Runner | None
    edits: list[Any]
    done: Quantized
    drop: float
    float_layers: list[str]


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """``w`` on a symmetric int8 grid with one scale per output channel (dim 0)."""
    import torch

    flat = w.detach().reshape(w.shape[0], -1)
    scale = (flat.abs().amax(dim=1) / 127.0).clamp_min(torch.finfo(torch.float32).eps)
    q = torch.clamp(torch.round(flat / scale[:, None]), -127, 127) * scale[:, None]
    return q.reshape(w.shape).to(w.dtype)


def fake_quant_activation(x: torch.Tensor, lo: float, hi: float, quant_max: int = 255) -> torch.Tensor:
    """``x`` on an affine unsigned grid of ``quant_max + 1`` levels over ``[lo, hi]`` (0 included)."""
    import torch

    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / quant_max, torch.finfo(torch.float32).eps)
    zero_point = int(min(quant_max, max(0, round(-lo / scale))))
    return torch.fake_quantize_per_tensor_affine(x.float(), scale, zero_point, 0, quant_max).to(x.dtype)


def _first_float(args: tuple[Any, ...]) -> int | None:
    import torch

    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return i
    return None


def _widen(ranges: dict[str, list[float]], key: str, t: torch.Tensor) -> None:
    lo, hi = float(t.detach().min()), float(t.detach().max())
    r = ranges.setdefault(key, [lo, hi])
    r[0], r[1] = min(r[0], lo), max(r[1], hi)


def layer_sensitivity(
    model: nn.Module,
    names: list[str],
    batches: list[Any],
    select: Any,
    reduce_range: bool = False,
    outputs: bool = False,
) -> list[tuple[str, float]]:
    """``(name, output SQNR in dB)`` of each layer in ``names`` when it alone is fake-quantized
    (weights: every floating-point parameter of two or more dimensions, per output channel; input:
    its first floating-point positional argument, per tensor over the range seen on ``batches``;
    with ``outputs``, its tensor output too, for schemes that quantize a layer's output),
    most sensitive (lowest SQNR) first. ``model``: fp32, CPU, eval (left unchanged);
    ``select(output, inputs)``: the task's scored output."""
    import torch

    from compress_cli._utils.batches import call

    modules = dict(model.named_modules())
    ranges: dict[str, list[float]] = {}

    def observe(name: str) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            i = _first_float(args)
            if i is not None:
                _widen(ranges, name, args[i])

        return hook

    def observe_out(name: str) -> Any:
        def hook(_m: nn.Module, _args: tuple[Any, ...], out: Any) -> None:
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                _widen(ranges, name + "\0out", out)

        return hook

    handles = [modules[n].register_forward_pre_hook(observe(n)) for n in names]
    if outputs:
        handles += [modules[n].register_forward_hook(observe_out(n)) for n in names]
    try:
        with torch.inference_mode():
            refs = [select(call(model, x), x).float() for x in batches]
    finally:
        for h in handles:
            h.remove()
    quant_max = 127 if reduce_range else 255
    out = []
    for name in names:
        module = modules[name]
        saved = {k: p.data for k, p in module.named_parameters(recurse=False)}
        hooks = []
        if name in ranges:
            lo, hi = ranges[name]

            def pre(_m: nn.Module, args: tuple[Any, ...], lo: float = lo, hi: float = hi) -> Any:
                i = _first_float(args)
                if i is None:
                    return None
                return (*args[:i], fake_quant_activation(args[i], lo, hi, quant_max), *args[i + 1 :])

            hooks.append(module.register_forward_pre_hook(pre))
        if name + "\0out" in ranges:
            olo, ohi = ranges[name + "\0out"]

            def post(_m: nn.Module, _a: tuple[Any, ...], out: Any, lo: float = olo, hi: float = ohi) -> Any:
                return fake_quant_activation(out, lo, hi, quant_max)

            hooks.append(module.register_forward_hook(post))
        try:
            for p in module.parameters(recurse=False):
                if p.dim() >= 2 and p.is_floating_point():
                    p.data = fake_quant_weight(p.data)
            signal = noise = 0.0
            with torch.inference_mode():
                for x, ref in zip(batches, refs, strict=True):
                    y = select(call(model, x), x).float()
                    signal += float(ref.double().pow(2).sum())
                    noise += float((y.double() - ref.double()).pow(2).sum())
        finally:
            for h in hooks:
                h.remove()
            for k, p in module.named_parameters(recurse=False):
                p.data = saved[k]
        if noise <= 0:
            sqnr = 200.0
        elif signal <= 0:
            sqnr = -200.0
        else:
            sqnr = min(200.0, 10 * math.log10(signal / noise))
        out.append((name, round(sqnr, 2)))
    return sorted(out, key=lambda t: t[1])


def drop_points(task: Any, ref: float, value: float) -> float:
    """How much worse ``value`` is than ``ref`` in the task's primary metric, in points: x100 for
    classification accuracy (top-1 percentage points, as ``guard.max_accuracy_drop``), the metric's
    own units otherwise (as ``guard.max_metric_drop``); direction-aware."""
    worse = (ref - value) if task.higher_is_better else (value - ref)
    return round(worse * (100.0 if task.name == "classification" else 1.0), 4)


def gate_options(options: Any) -> Any:
    """The options a conversion under ``max_accuracy_drop`` runs with: the budget, measured on
    the data, is the gate, so ``min_sqnr_db`` is 0 unless the recipe sets it (a low logit SQNR may
    be what the fallback recovers). Without a budget, ``options`` as they are."""
    if getattr(options, "max_accuracy_drop", None) is None or "min_sqnr_db" in options.model_fields_set:
        return options
    return options.model_copy(update={"min_sqnr_db": 0.0})


def selection_split(state: State) -> str:
    """The split a quantization choice is scored on (the budget loop's steps, ``scheme: auto``'s
    candidates): ``val``, so that nothing is selected on the numbers the pipeline reports, or the
    measure split when there is no validation split (``val_fraction: 0``)."""
    if len(state.data.loader("val").dataset) == 0:  # type: ignore[arg-type]
        return state.recipe.measure.split
    return "val"


class _Budget:
    """One budgeted conversion: the evaluation it repeats and the state it restores between tries."""

    def __init__(self, handler: SchemeHandler, state: State, options: Any, label: str):
        self.handler, self.state, self.options, self.label = handler, state, options, label
        self.task = state.data.get_task()
        #: what a drop is counted in (see drop_points)
        self.unit = " points" if self.task.name == "classification" else ""
        self.split = selection_split(state)
        self.fp32 = state.model
        self.runner = state.runner
        self.n_transforms = len(state.transforms)
        self.n_edits = len(state.edits.items)

    def score(self, runner: Any) -> dict[str, Any]:
        """The task's primary metric of ``runner`` on the (capped) evaluation split: its name,
        ``score``, ``higher_is_better`` and ``samples``."""
        from compress_cli.runtime.measure import evaluate

        loader = self.state.data.loader(self.split)
        n = self.options.budget_batches
        batches = loader if n is None else itertools.islice(loader, n)
        scores = evaluate(runner, batches, self.task, split=self.split)  # type: ignore[arg-type]
        primary = self.task.primary
        if primary not in scores:
            self.task.report_fields(scores)  # the task's own message naming what it measured
            raise StageError(f"max_accuracy_drop: the task measured no {primary!r}")
        return {
            "primary": primary,
            "score": scores[primary],
            "higher_is_better": self.task.higher_is_better,
            "samples": int(scores["samples"]),
        }

    def latency_ms(self, runner: Any) -> float:
        """A rough batch-1 latency (median of a few calls; the pipeline times the kept result)."""
        import torch

        from compress_cli.runtime.measure import cpu_threads, time_calls

        lat = self.state.recipe.measure.latency
        x = self.state.data.example_input(1)
        with cpu_threads(lat.threads if lat is not None else None), torch.inference_mode():
            t = time_calls(runner, x, runner.input_device(), 3, STEP_LATENCY_CALLS)
        return round(statistics.median(t) * 1e3, 4)

    def restore(self) -> None:
        """The state as the stage received it."""
        s = self.state
        s.model, s.runner = self.fp32, self.runner
        del s.transforms[self.n_transforms :]
        del s.edits.items[self.n_edits :]

    def keep(self, kept: _Kept) -> None:
        """Leave ``kept`` in the state."""
        self.restore()
        s = self.state
        s.model, s.runner = kept.model, kept.runner
        s.transforms.extend(kept.transforms)
        s.edits.items.extend(kept.edits)

    def convert(self, float_layers: list[str]) -> Quantized:
        """The scheme with ``float_layers`` added to ``exclude``, seeded as the stage's conversion."""
        import torch

        options = self.options.model_copy(update={"exclude": [*self.options.exclude, *float_layers]})
        self.restore()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.state.seed)
            return self.handler.convert(self.state, options, self.label)

    def candidates(self) -> list[str]:
        """The layers the scheme converts and the recipe does not already exclude."""
        from torch import nn

        from compress_cli.quantization.schemes import get_scheme

        kinds = tuple(getattr(nn, k) for k in get_scheme(self.options.scheme).layers)
        excluded = self.options.exclude
        skip = {n for n, _ in self.state.select_modules(excluded)} if excluded else set()
        return [n for n, _ in self.state.select_modules(kinds=kinds) if n not in skip]

    def ranking(self) -> list[tuple[str, float]]:
        """The candidates, most sensitive first (see the module docstring)."""
        from compress_cli.pruning import permanent_copy
        from compress_cli.quantization.base import cpu_inputs
        from compress_cli.quantization.cpu import choose_reduce_range
        from compress_cli.quantization.schemes import get_scheme

        data = self.state.data
        batches = data.calibration_inputs()[:SENSITIVITY_BATCHES]
        if not batches:
            train = itertools.islice(data.loader("train", shuffle=False), SENSITIVITY_BATCHES)
            batches = [self.task.inputs(b) for b in train]
        if not batches:
            raise StageError(
                "max_accuracy_drop: no calibration data to rank layers by (the training split is empty)"
            )
        rr = self.options.reduce_range
        if "reduce_range" not in get_scheme(self.options.scheme).options:
            reduce_range = False  # OpenVINO: full 8-bit activations, its kernels choose for themselves
        else:
            reduce_range = choose_reduce_range()[0] if rr is None else bool(rr)
        model = permanent_copy(self.fp32).cpu().eval()
        outputs = getattr(self.handler, "quantizes_outputs", None)
        return layer_sensitivity(
            model,
            self.candidates(),
            [cpu_inputs(b) for b in batches],
            self.task.select,
            reduce_range,
            outputs=bool(outputs(self.options)) if callable(outputs) else False,
        )


def convert_within_budget(handler: SchemeHandler, state: State, options: Any, label: str) -> Quantized:
    """Convert ``state.model`` with ``handler`` so that the primary metric falls by at most
    ``options.max_accuracy_drop`` points, keeping up to ``options.max_float_layers`` of the most
    sensitive layers in floating point (see the module docstring). Leaves the best result found in
    the state; its :class:`Quantized` carries the step table in ``details["budget"]`` and, when the
    budget is not met, one violation. A StageError only when no conversion succeeded at all."""
    import torch

    options = gate_options(options)
    b = _Budget(handler, state, options, label)
    budget, cap = float(options.max_accuracy_drop), int(options.max_float_layers)
    fp32 = b.score(state.current_runner())
    fp32_latency = b.latency_ms(state.current_runner())
    info: dict[str, Any] = {
        "max_accuracy_drop": budget,
        "max_float_layers": cap,
        "metric": fp32["primary"],
        "split": b.split,
        "samples": fp32["samples"],
        "budget_batches": options.budget_batches,
        "fp32_score": fp32["score"],
        "fp32_latency_ms": fp32_latency,
        "sensitivity": None,
        "steps": [],
    }
    best: _Kept | None = None
    best_step = 0
    ranked: list[tuple[str, float]] | None = None
    float_layers: list[str] = []
    met = False
    while True:
        step: dict[str, Any] = {"float_layers": list(float_layers)}
        try:
            done = b.convert(float_layers)
        except StageError as e:
            step.update(accepted=False, why=f"refused: {e}")
            done = None
        if done is not None:
            runner = state.current_runner()
            with torch.inference_mode():
                scores = b.score(runner)
            drop = drop_points(b.task, fp32["score"], scores["score"])
            step.update(score=scores["score"], drop=drop, latency_ms=b.latency_ms(runner))
            met = drop <= budget
            step["accepted"] = met
            step["why"] = (
                f"drop {drop:.4g} <= {budget}{b.unit}" if met else f"drop {drop:.4g} > {budget}{b.unit}"
            )
            if best is None or drop < best.drop:
                best_step = len(info["steps"])
                best = _Kept(
                    state.model,
                    state.transforms[b.n_transforms :],
                    state.runner,
                    state.edits.items[b.n_edits :],
                    done,
                    drop,
                    list(float_layers),
                )
        info["steps"].append(step)
        if met:
            break
        if len(float_layers) >= cap:
            step["why"] += f"; max_float_layers {cap} reached"
            break
        if ranked is None:
            ranked = b.ranking()
            info["sensitivity"] = [{"layer": n, "output_sqnr_db": s} for n, s in ranked[:SENSITIVITY_LISTED]]
        left = [n for n, _ in ranked if n not in float_layers]
        if not left:
            step["why"] += "; every quantized layer is already in float"
            break
        float_layers.append(left[0])
    b.restore()
    if best is None:
        steps = "; ".join(f"{s['float_layers'] or 'none'} float: {s['why']}" for s in info["steps"])
        raise StageError(
            f"{options.scheme}: no conversion within max_accuracy_drop succeeded ({steps}); "
            "raise max_float_layers, or try another scheme"
        )
    b.keep(best)
    info.update(met=met, float_layers=best.float_layers, drop=best.drop)
    done = best.done
    save = getattr(handler, "save", None)  # the handlers that write deployment files
    if best_step != len(info["steps"]) - 1 and done.artifacts and callable(save) and best.runner is not None:
        # every later step (a refused one too) wrote its own deployment files over the kept one's
        done.artifacts = save(best.runner.model, state, done.details)
    done.details["budget"] = info
    where = f"{info['samples']} {b.split} samples"
    kept = ", ".join(best.float_layers) or "none"
    if met:
        done.notes += (
            f"; within max_accuracy_drop {budget}: drop {best.drop:.4g}{b.unit} on {where}, float: {kept}"
        )
        info["why"] = f"met with {len(best.float_layers)} layer(s) in float"
    else:
        stage_dir = getattr(state.ctx, "stage_dir", None)
        saved = f" ({stage_dir}/model)" if stage_dir is not None else ""
        n = len(best.float_layers)
        info["why"] = f"not met: the best drop is {best.drop:.4g}{b.unit} with {n} layer(s) in float"
        done.notes += f"; max_accuracy_drop {budget} NOT met: best drop {best.drop:.4g}{b.unit} on {where}"
        done.violations.append(
            f"quantize.max_accuracy_drop: {options.scheme} drops {best.drop:.4g}{b.unit} of "
            f"{fp32['primary']} on {where} with {len(best.float_layers)} layer(s) in float ({kept}); "
            f"budget {budget}, max_float_layers {cap}. The best result found is this stage's result{saved}; "
            "raise max_float_layers or max_accuracy_drop, or try another scheme"
        )
    return done
