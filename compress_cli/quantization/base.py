"""How a scheme is applied: the handler every scheme registers, and the SQNR-gated int8 conversion.

A handler (bound to a scheme by :func:`~compress_cli.quantization.schemes.register_scheme`, in the
style of torchao's per-config handlers) answers three questions:

* ``convert(state, options, label)``, the stage path: leaves in the state the module the checkpoint
  stores, the manifest's ``transforms`` entry and the runner that measures the result;
* ``build_runtime(model, entry, device)``: the module that runs, from the stored module and the
  entry. The stage and ``compress_cli.load()`` both call it, so what load() returns is built by the
  same deterministic function, from the same inputs, as the module the report measured;
* ``runner(runtime, entry, state)``: how that module is measured (also after ``--resume``).

The stored module is an ordinary ``nn.Module`` whose weights are already on the scheme's grid
(the checkpoint's palette encoding then stores int8 grids at 8 bits per weight); what cannot be
re-derived from the weights (activation scales, zero points) goes into the entry, arrays packed
with :func:`~compress_cli._utils.arrays.pack_array`. Torch-free at import, like the package.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from compress_cli.errors import StageError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from compress_cli.runtime.inputs import InputSpec
    from compress_cli.runtime.runners import Runner
    from compress_cli.state import State


@dataclass
class Quantized:
    """What applying a scheme reports: the stage's notes, its report details, files it wrote."""

    notes: str
    details: dict[str, Any]
    artifacts: list[str] = field(default_factory=list)
    #: limits of the stage's own options the result does not meet (handled like guard violations)
    violations: list[str] = field(default_factory=list)


class SchemeHandler:
    """Applies a scheme. Subclass, override :meth:`build_runtime`, register with ``@register_scheme``.

    The default :meth:`convert` fits a scheme that needs only its name and the weights: it builds the
    runtime from the state's model and records the entry so that load() builds it again. ``options``
    is the ``quantize`` stage's config (``scheme``, ``exclude``, ... ; see QuantizeConfig)."""

    def entry(self, state: State, options: Any) -> dict[str, Any]:
        """The manifest's ``transforms`` entry: what :meth:`build_runtime` needs besides the weights."""
        return {"type": "quantize", "scheme": options.scheme}

    def build_runtime(self, model: nn.Module, entry: dict[str, Any], device: Any = None) -> nn.Module:
        """The module that runs, from the stored ``model`` (which it may change or reuse) and ``entry``.
        ``device``: the run's device (None when ``compress_cli.load()`` calls it)."""
        raise NotImplementedError

    def runner(self, runtime: nn.Module, entry: dict[str, Any], state: State) -> Runner | None:
        """The runner that measures ``runtime`` (None: the pipeline's own, on ``state.model``)."""
        if runtime is state.model:
            return None
        from compress_cli.runtime.runners import EagerRunner

        return EagerRunner(runtime, state.device)

    def export_model(self, fmt: str, state: State, entry: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """What the ``export`` stage writes as ``fmt`` when the plain model is not it: a module, or
        for onnx the file's bytes, plus details for the report. ``(None, {})``: the plain model."""
        return None, {}

    def preflight(self, state: State, options: Any) -> None:
        """Raise :class:`~compress_cli.errors.StageError` (the reason and the way out) when the
        scheme cannot convert ``state.model``, before anything runs; must not modify the state.
        The default checks nothing."""

    def convert(self, state: State, options: Any, label: str) -> Quantized:
        """Apply the scheme to ``state.model`` (the stage path); ``label`` names the stage in the edits."""
        entry = self.entry(state, options)
        runtime = self.build_runtime(state.model, entry, state.device)
        state.transforms.append(entry)
        state.runner = self.runner(runtime, entry, state)
        state.edits.record(label, op="quantize", scheme=entry["scheme"])
        measured = state.runner.runtime if state.runner is not None else "torch-eager"
        return Quantized(notes="", details={"scheme": entry["scheme"], "runtime": measured})


#: the preflight's trial conversion calibrates on this many samples of the example batch and is
#: scored on as many others (in batches of ``PREFLIGHT_BATCH``): scored on the samples it was
#: calibrated on, a conversion whose ranges do not generalise looks better than it is
PREFLIGHT_SAMPLES = 8
PREFLIGHT_BATCH = 2
#: how far below ``min_sqnr_db`` the preflight's trial SQNR must fall to be refused up front
PREFLIGHT_SQNR_SLACK_DB = 6.0


def sqnr_db(reference: torch.Tensor, output: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``output`` against ``reference`` in dB (capped at 200)."""
    ref = reference.detach().float().cpu()
    noise = float((ref - output.detach().float().cpu()).pow(2).mean())
    signal = float(ref.pow(2).mean())
    if noise == 0:
        return 200.0
    if signal == 0:
        return -200.0
    return round(min(200.0, 10 * math.log10(signal / noise)), 2)


def cpu_inputs(inputs: Any) -> Any:
    """Model inputs on the CPU, floating-point tensors as float32; integer tensors (token ids,
    masks) keep their dtype."""
    from compress_cli._utils.batches import map_tensors

    return map_tensors(
        inputs, lambda t: t.detach().cpu().float() if t.is_floating_point() else t.detach().cpu()
    )


def floored_reason(floored: list[str]) -> str:
    """Why an SQNR is low when activations sit at the quantizer's smallest scale (``floored``:
    their observed edges, see ``pt2e.activations_at_min_scale``)."""
    span = f"from {floored[0]} to {floored[-1]}" if len(floored) > 1 else floored[0]
    return (
        f"{len(floored)} activation tensor(s) span fewer than 255 steps of the smallest int8 scale "
        f"({span}), which no calibration data can change"
    )


def sqnr_way_out(scheme: str, options: Any, floored: list[str] | None = None) -> str:
    """What may raise a scheme's logit SQNR, naming only the recipe keys that apply to it and its
    mode (dynamic quantization does not calibrate: no calibration hint for it). ``floored``:
    activations at the smallest scale, where more calibration cannot help but keeping the layers
    after them in float, or ONNX Runtime (whose scales have no floor), can."""
    from compress_cli.quantization.schemes import get_scheme

    opts = get_scheme(scheme).options
    dynamic = scheme == "int8_dynamic" or getattr(options, "mode", "static") == "dynamic"
    if floored:
        return (
            "exclude: [the layers those activations feed, e.g. the classifier], scheme "
            "onnxruntime_int8 (no smallest scale) or a lower min_sqnr_db"
        )
    tips = []
    if "reduce_range" in opts:
        tips.append("reduce_range: true")
    if "calibration_batches" in opts and not dynamic:
        tips.append("more calibration_batches")
    if "calibrate_method" in opts and not dynamic:
        tips.append("calibrate_method: entropy or percentile")
    if "op_types_to_quantize" in opts:
        tips.append("op_types_to_quantize: [MatMul, Gemm, Conv] (fewer op types in int8)")
    if "mode" in opts and not dynamic:
        tips.append("mode: dynamic")
    tips.append("exclude: [the most sensitive layers, e.g. the classifier]")
    tips.append("a lower min_sqnr_db")
    return ", ".join(tips[:-1]) + " or " + tips[-1]


@dataclass
class Int8Job:
    """One int8 conversion in progress: what :meth:`Int8Handler.snap` reads and fills in."""

    state: State
    options: Any
    label: str
    entry: dict[str, Any]  # the manifest's transforms entry
    details: dict[str, Any]  # the report's stage details
    exclude: list[str]  # module names kept in floating point
    reduce_range: bool
    reduce_range_reason: str
    #: (val inputs, the fp32 model's task-selected output on them) for the SQNR gate
    check: tuple[Any, torch.Tensor] | None = None
    #: a preflight's trial conversion: this example batch stands in for the data (tracing, folding)
    trial: Any = None
    #: a preflight's calibration batches (None: ``trial`` alone)
    trial_calibration: list[Any] | None = None

    @property
    def spec(self) -> InputSpec:
        """What the model is called with (recorded in the entry: load() rebuilds with it)."""
        from compress_cli.runtime.inputs import InputSpec

        return InputSpec.from_entry(self.entry)

    def keep_reference(self, model: nn.Module) -> None:
        """Take the fp32 output the int8 result must follow: ``model``'s task-selected output on
        the inputs of a validation batch."""
        import torch

        task = self.state.data.get_task()
        x = cpu_inputs(task.inputs(next(iter(self.state.data.loader("val")))))
        with torch.inference_mode():
            self.check = (x, task.forward(model, x))

    def fold_batchnorm(self, model: nn.Module) -> nn.Module:
        """The static schemes' first step: fold BN into the convolutions of ``model`` (this job's
        own copy, in place) and record the activation range choice."""
        from compress_cli.quantization.fold import fold_batchnorm

        example = self.trial if self.trial is not None else self.state.data.example_input(2)
        model, folded = fold_batchnorm(model, example, inplace=True)
        self.details["folded_batchnorm"] = folded
        self.details["reduce_range"] = self.reduce_range
        self.details["reduce_range_reason"] = self.reduce_range_reason
        self.entry["reduce_range"] = self.reduce_range
        return model

    def calibration(self) -> list[Any]:
        """The calibration inputs: the model inputs of ``calibration_batches`` training batches
        (CPU; floating-point tensors fp32, token ids left as they are); in a preflight's trial,
        its calibration batches."""
        if self.trial is not None:
            return list(self.trial_calibration or [self.trial])
        data = self.state.data
        n = self.options.calibration_batches or data.calibration_batches
        batches = data.calibration_inputs()[:n]
        if len(batches) < n:
            task = data.get_task()
            batches = []
            for i, batch in enumerate(data.loader("train", shuffle=False)):
                if i >= n:
                    break
                batches.append(task.inputs(batch))
        if not batches:
            raise StageError("no calibration data: the training split is empty")
        self.details["calibration_batches"] = len(batches)
        return [cpu_inputs(b) for b in batches]


class Int8Handler(SchemeHandler):
    """A CPU int8 conversion, accepted only when the int8 logits follow fp32 on a validation batch
    (logit SQNR >= ``min_sqnr_db``: catches e.g. int16 saturation). Subclasses implement :meth:`snap`
    and :meth:`build_runtime`; the result is measured on CPU."""

    def snap(self, model: nn.Module, job: Int8Job) -> nn.Module:
        """Put the weights of ``model`` (the job's fp32 copy, CPU, eval, pruning made permanent) on
        the int8 grid the runtime uses and fill ``job.entry`` / ``job.details``; returns the module
        the checkpoint stores."""
        raise NotImplementedError

    def save(self, runtime: nn.Module, state: State, details: dict[str, Any]) -> list[str]:
        """Files written besides the checkpoint (paths, for the report's artifacts)."""
        return []

    def job(self, state: State, options: Any, label: str, trial: Any = None) -> Int8Job:
        """A conversion of ``state.model`` with ``options`` (``trial``: a preflight's example batch).
        The entry records the input spec of the data's example batch (load() rebuilds with it)."""
        from compress_cli.quantization.cpu import choose_reduce_range
        from compress_cli.runtime.inputs import InputSpec

        scheme = options.scheme
        exclude = [n for n, _ in state.select_modules(options.exclude)] if options.exclude else []
        if options.reduce_range is None:
            reduce_range, why = choose_reduce_range()
        else:
            reduce_range, why = bool(options.reduce_range), "set in the recipe"
        example = trial if trial is not None else cpu_inputs(state.data.example_input(2))
        spec = InputSpec.from_example(example, state.model).to_json()  # floats as fp32, as converted
        entry = {"type": "quantize", "scheme": scheme, "exclude": exclude, "input_spec": spec}
        details: dict[str, Any] = {"scheme": scheme}
        return Int8Job(state, options, label, entry, details, exclude, reduce_range, why, trial=trial)

    def way_out(self, options: Any) -> str:
        """What a recipe can change when this scheme cannot convert the model."""
        return "try another scheme, or exclude the layers involved (exclude: [module globs])"

    #: whether :meth:`trial` returns the int8 runtime itself (its output SQNR then means something)
    trial_is_runtime = True

    def trial(self, model: nn.Module, job: Int8Job) -> nn.Module:
        """The conversion path on ``model`` (a throwaway copy) for a preflight: snap with the trial
        batch as calibration, build the runtime as load() would (uncompiled). Returns the runtime."""
        return self.build_runtime(self.snap(model, job), job.entry)

    def preflight(self, state: State, options: Any) -> None:
        """Try the conversion on a throwaway copy of the model with a few example samples (no
        calibration over the data): whatever would fail there fails here, before the baseline,
        with the reason and the way out. The trial calibrates on ``PREFLIGHT_SAMPLES`` samples of
        the example batch and is scored on as many others (the run's gate, too, scores on data it
        did not calibrate on; an evaluation split with fewer samples repeats them). A trial output
        SQNR at or below 0 dB, or more than ``PREFLIGHT_SQNR_SLACK_DB`` below ``min_sqnr_db``, is
        refused (a few samples
        are a noisy estimate: only a clearly broken conversion, e.g. activations below the
        quantizer's smallest scale, is refused here; the run's gate decides the rest)."""
        import torch

        from compress_cli._utils.batches import call, samples
        from compress_cli.pruning import permanent_copy

        task = state.data.get_task()
        n, b = PREFLIGHT_SAMPLES, PREFLIGHT_BATCH
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(state.seed)
            example = cpu_inputs(state.data.example_input(2 * n))
            chunks = [samples(example, i, i + b) for i in range(0, 2 * n, b)]
            calibrate, scored = chunks[: n // b], chunks[n // b :]
            job = self.job(state, options, "preflight", trial=calibrate[0])
            job.trial_calibration = calibrate
            try:
                model = permanent_copy(state.model).cpu().eval()
                with torch.inference_mode():
                    reference = [task.select(call(model, x), x).float().flatten() for x in scored]
                runtime = self.trial(model, job)
                with torch.inference_mode():
                    output = [task.select(call(runtime, x), x).float().flatten() for x in scored]
            except StageError as e:
                raise StageError(f"{options.scheme} cannot convert this model: {e}") from None
            except Exception as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise StageError(
                    f"{options.scheme} cannot convert this model ({type(e).__name__}: {first[:300]}); "
                    f"{self.way_out(options)}"
                ) from None
        sqnr = sqnr_db(torch.cat(reference), torch.cat(output))
        floored = job.details.get("activations_at_min_scale") or []
        # the slack absorbs what a few calibration samples get wrong; activations below the
        # smallest scale stay there whatever the calibration data, so then no slack is given
        limit = options.min_sqnr_db - (0.0 if floored else PREFLIGHT_SQNR_SLACK_DB)
        # at or below 0 dB the output is no closer to fp32's than zeros are: broken, not noisy
        # (mobileone_s0 at a 5 dB gate: the slack's -1 dB let a 0.0 dB conversion through)
        garbage = sqnr <= 0.0 < options.min_sqnr_db
        if self.trial_is_runtime and (sqnr < limit or garbage):
            why = (
                f"below min_sqnr_db {options.min_sqnr_db}, and {floored_reason(floored)}"
                if floored
                else f"far below min_sqnr_db {options.min_sqnr_db} ("
                + (
                    "no closer to fp32's output than zeros"
                    if garbage
                    else "e.g. activations too small for int8 scales"
                )
                + ")"
            )
            raise StageError(
                f"{options.scheme}: a trial conversion calibrated on {n} samples gives output SQNR "
                f"{sqnr:.1f} dB on {n} others, {why}; try {sqnr_way_out(options.scheme, options, floored)}"
            )

    def runner(self, runtime: nn.Module, entry: dict[str, Any], state: State) -> Runner | None:
        """Eager on CPU (the int8 kernels are CPU kernels)."""
        import torch

        from compress_cli.runtime.runners import EagerRunner

        return EagerRunner(runtime, torch.device("cpu"))

    def convert(self, state: State, options: Any, label: str) -> Quantized:
        """Snap, build the runtime, measure its logits against fp32 (refused below ``min_sqnr_db``),
        then leave the stored module, entry and runner in the state."""
        import torch

        from compress_cli.pruning import permanent_copy
        from compress_cli.quantization.schemes import get_scheme

        scheme = options.scheme
        reference = permanent_copy(state.model).cpu().eval()
        job = self.job(state, options, label)
        entry, reduce_range, why = job.entry, job.reduce_range, job.reduce_range_reason
        # the fp32 logits are taken first, so the conversion works on this one copy; a scheme that
        # trains takes them after training (its snap calls job.keep_reference)
        if not get_scheme(scheme).trains:
            job.keep_reference(reference)
        model = self.snap(reference, job)
        del reference
        assert job.check is not None
        x, y_ref = job.check
        details = job.details
        runtime = self.build_runtime(model, entry)
        artifacts = self.save(runtime, state, details)
        runner = self.runner(runtime, entry, state)
        assert runner is not None
        with torch.inference_mode():
            runner.prepare()
            y = state.data.get_task().select(runner(x), x)
        sqnr = sqnr_db(y_ref, y)
        details.update(sqnr_db=sqnr, min_sqnr_db=options.min_sqnr_db, runtime=runner.runtime)
        if sqnr < options.min_sqnr_db:
            rr = (
                f"; reduce_range={reduce_range} ({why})"
                if "reduce_range" in get_scheme(scheme).options
                else ""
            )
            floored = details.get("activations_at_min_scale") or []
            low = f"; {floored_reason(floored)}" if floored else ""
            raise StageError(
                f"{scheme}: the int8 model's output is too far from fp32's (SQNR {sqnr:.1f} dB < min_sqnr_db "
                f"{options.min_sqnr_db}){rr}{low}; try {sqnr_way_out(scheme, options, floored)}"
            )
        state.model = model
        state.transforms.append(entry)
        state.runner = runner
        state.edits.record(label, op="quantize", scheme=scheme, reduce_range=entry.get("reduce_range"))
        notes = f"{scheme} -> {runner.runtime}, output SQNR {sqnr:.1f} dB"
        if "reduce_range" in entry:
            notes += f", reduce_range={'on' if reduce_range else 'off'}"
        return Quantized(notes=notes, details=details, artifacts=artifacts)
