"""The ``quantize`` stage: the recipe options, checked against the scheme table, then the library.

What each scheme does lives in :mod:`compress_cli.quantization` (one module per backend); this
module stays torch-free at import, so ``compress validate`` answers without loading torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from compress_cli.errors import StageError
from compress_cli.quantization.schemes import SCHEMES, Scheme, applies_to
from compress_cli.stages.base import Stage, StageConfig, StageResult
from compress_cli.stages.registry import register_stage
from compress_cli.state import State
from compress_cli.training import TrainOptions

_TRAINING = frozenset(TrainOptions.model_fields)


#: ``scheme: auto``: every candidate scheme of the target's runtimes, measured, the fastest kept
AUTO = "auto"
#: the options of ``scheme: auto`` (each candidate gets them)
_AUTO_OPTIONS = frozenset(
    {"target", "max_accuracy_drop", "max_float_layers", "exclude", "min_sqnr_db", "calibration_batches"}
)


def _scheme_enum(schema: dict[str, Any]) -> None:
    schema["enum"] = [*SCHEMES, AUTO]  # at schema time: plugin schemes included


class TargetConfig(BaseModel):
    """``scheme: auto``'s deployment target: the batch it is timed at and the runtimes it may use."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="batch size the candidates are timed at (default: the first "
        "of measure.latency.batch_sizes, else 1)",
    )
    runtimes: list[Literal["torch", "onnxruntime", "openvino"]] | None = Field(
        None,
        min_length=1,
        description="runtimes whose schemes are candidates (torch: int8_static [+ int8_dynamic for "
        "Linear-dominated models]; onnxruntime: onnxruntime_int8, onnxruntime_fp32; openvino: "
        "openvino_int8, openvino_fp32, each also with inference_precision bf16 where the CPU has bf16 "
        "units); default: the installed ones",
    )


class QuantizeConfig(StageConfig, TrainOptions):
    """Quantize the model; ``scheme`` chooses what and for which runtime (see the stage docstring).

    The training options (epochs, lr, ...) apply to ``qat`` only; its default is one short epoch."""

    scheme: str = Field(description=" | ".join([*SCHEMES, AUTO]), json_schema_extra=_scheme_enum)
    target: TargetConfig | None = Field(
        None,
        description="scheme auto: the deployment target (batch, runtimes) the candidates are measured for",
    )
    max_accuracy_drop: float | None = Field(
        None,
        ge=0,
        le=100,
        description="accuracy budget: how much the task's primary metric may fall on the validation "
        "split against the model the stage receives (classification: top-1 points; other tasks: the "
        "metric's units); a fixed int8 scheme returns its most sensitive layers to float one at a "
        "time until it holds (max_float_layers); scheme auto does so for each int8 candidate that "
        "supports it and keeps the fastest candidate within it (unset: 1.0, no fallback)",
    )
    calibration_batches: int | None = Field(
        None,
        gt=0,
        le=10_000,
        description="training batches used to calibrate activation ranges "
        "(default: data.calibration_batches)",
    )
    reduce_range: bool | None = Field(
        None,
        description="7-bit activations; unset: chosen from the CPU "
        "(on for x86 without VNNI/AMX, avoids int16 saturation)",
    )
    min_sqnr_db: float = Field(
        20.0,
        ge=0,
        le=100,
        description="refuse the result when the int8 logits' SQNR against fp32 is below this (dB); "
        "with max_accuracy_drop: 0 unless set (the budget is the gate)",
    )
    exclude: list[str] = Field(
        default_factory=list, description="module name globs to keep in floating point"
    )
    compile: bool = Field(
        True,
        description="int8_static/qat: run through torch.compile (inductor, freezing); "
        "false = converted graph in eager, 2-3x slower than fp32",
    )
    backend: Literal["pt2e", "fx"] | None = Field(
        None,
        description="int8_static: pt2e (torchao, compiled) or fx (torch.ao, deprecated upstream, eager); "
        "unset: pt2e when torchao is installed",
    )
    calibrate_method: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="onnxruntime_int8: how activation ranges are calibrated"
    )
    opset: int = Field(17, ge=13, le=23, description="onnxruntime_int8: ONNX opset of the export")
    exporter: Literal["auto", "torchscript", "dynamo"] = Field(
        "auto",
        description="onnxruntime_int8: torch.onnx exporter; auto: torchscript (much faster to export), "
        "then dynamo where torchscript refuses an op (the one used is recorded)",
    )
    op_types_to_quantize: list[str] | None = Field(
        None,
        description="onnxruntime_int8: the ONNX op types to quantize (e.g. [MatMul, Gemm, Conv]); unset: "
        "MatMul, Gemm (+Conv) for models with attention or embedding modules, so mask arithmetic, "
        "embedding gathers and norms stay float; every op type ONNX Runtime can quantize otherwise",
    )
    mode: Literal["static", "dynamic"] = Field(
        "static",
        description="onnxruntime_int8: static (calibrated activation ranges, QDQ) or dynamic (ONNX "
        "Runtime quantize_dynamic: activations quantized at run time, no calibration; the usual "
        "choice for transformers)",
    )
    group_size: int = Field(
        128, ge=16, le=1024, description="int4_weight_only: weights per scale along the input dimension"
    )
    inference_precision: Literal["f32", "bf16"] = Field(
        "f32",
        description="openvino_int8/openvino_fp32: the precision OpenVINO computes the model's float "
        "parts in (INFERENCE_PRECISION_HINT); bf16 needs a CPU with bf16 units (AVX512_BF16, AMX) and "
        "trades fidelity to fp32 for speed; scheme auto measures both where the CPU has them",
    )
    max_float_layers: int = Field(
        8,
        ge=1,
        le=10_000,
        description="max_accuracy_drop: the most layers returned to floating point (one conversion each)",
    )
    budget_batches: int | None = Field(
        None,
        gt=0,
        le=100_000,
        description="max_accuracy_drop: validation batches evaluated per step (default: the whole split)",
    )

    @field_validator("scheme", mode="before")
    @classmethod
    def _known_scheme(cls, value: Any) -> Any:
        if not isinstance(value, str) or (
            value not in SCHEMES and value != AUTO
        ):  # reported like a Literal: "must be one of ..."
            names = [repr(n) for n in [*SCHEMES, AUTO]]
            expected = f"{', '.join(names[:-1])} or {names[-1]}"
            ctx = {"expected": expected}
            raise PydanticCustomError("literal_error", "Input should be {expected}", ctx)
        return value

    @model_validator(mode="after")
    def _options_match_scheme(self) -> QuantizeConfig:
        fields = type(self).model_fields
        budgeting = [k for k in ("max_float_layers", "budget_batches") if k in self.model_fields_set]
        budgeting = [k for k in budgeting if getattr(self, k) != fields[k].get_default()]
        if budgeting and self.max_accuracy_drop is None:
            raise ValueError(
                f"{', '.join(budgeting)}: only with max_accuracy_drop (the accuracy budget they bound); "
                "set max_accuracy_drop or remove them"
            )
        if self.scheme == AUTO:
            extra = [
                k
                for k in sorted(self.model_fields_set)
                if k not in StageConfig.model_fields
                and k not in _AUTO_OPTIONS | {"scheme"}
                and getattr(self, k) != fields[k].get_default(call_default_factory=True)
            ]
            if extra:
                raise ValueError(
                    f"{', '.join(extra)}: not an option of scheme auto (it takes "
                    f"{', '.join(sorted(_AUTO_OPTIONS))}; the candidates use their defaults)"
                )
            return self
        if self.target is not None:
            raise ValueError("target: only with scheme: auto (a fixed scheme runs where it runs)")
        scheme = SCHEMES[self.scheme]
        wrong = [  # a default value written back (recipe.yaml as run) is not an error
            k
            for k in sorted(self.model_fields_set)
            if k not in StageConfig.model_fields
            and k != "scheme"
            and k not in scheme.options
            and not (scheme.trains and k in _TRAINING)
            and getattr(self, k) != fields[k].get_default(call_default_factory=True)
        ]
        if wrong:
            k = wrong[0]
            raise ValueError(
                f"{', '.join(wrong)}: not an option of scheme {self.scheme} "
                f"({k} applies to {', '.join(applies_to(k, _TRAINING))})"
            )
        if self.mode == "dynamic":
            calibrating = [
                k for k in ("calibration_batches", "calibrate_method") if k in self.model_fields_set
            ]
            calibrating = [k for k in calibrating if getattr(self, k) != fields[k].get_default()]
            if calibrating:
                raise ValueError(
                    f"{', '.join(calibrating)}: not an option of mode dynamic (dynamic quantization does "
                    "not calibrate: activations are quantized at run time); remove it or set mode: static"
                )
        if self.op_types_to_quantize is not None and not self.op_types_to_quantize:
            raise ValueError("op_types_to_quantize is empty: list the ONNX op types, or leave it unset")
        if self.group_size & (self.group_size - 1):
            raise ValueError(f"group_size must be a power of two (got {self.group_size})")
        return self


def _scheme(config: StageConfig) -> Scheme | None:
    name = getattr(config, "scheme", "")
    return SCHEMES["int8_static"] if name == AUTO else SCHEMES.get(name)  # auto: CPU, freezes


@register_stage("quantize")
class Quantize(Stage[QuantizeConfig]):
    """Quantize the model for a real runtime: int8 on CPU (torch.ao dynamic, torchao PT2E static/QAT
    compiled by inductor, ONNX Runtime QDQ), torchao weight-only int8/int4 on CUDA, fp16/bf16 casts.

    int8 results are checked against fp32 (logit SQNR) before they are accepted; the model is then
    measured in the runtime it was converted for (``state.runner``), and nothing may train after a
    real int8 conversion. The checkpoint stores the weights snapped to the int8 grid (8 bits each
    after the palette encoding) plus the quantization parameters; ``compress_cli.load()`` rebuilds
    the same runtime module (see compress_cli/quantization/ for what each scheme returns).

    ``max_accuracy_drop`` (the post-training int8 schemes): an accuracy budget on the validation
    split; over it, the most sensitive layers return to float one at a time, each step re-converted
    and re-measured, up to ``max_float_layers``; the best result is kept and a budget not met is a
    violation of the stage, handled like a guard's (compress_cli/quantization/budget.py). With
    ``scheme: auto`` each int8 candidate that supports the budget runs that fallback; one that
    does not meet it is a rejected row of the candidate table, not a violation.
    """

    example = {"scheme": "int8_dynamic"}

    @classmethod
    def trains(cls, config: StageConfig) -> bool:
        """qat (a scheme that ``trains`` in the table)."""
        scheme = _scheme(config)
        return scheme is not None and scheme.trains

    @classmethod
    def freezes(cls, config: StageConfig) -> bool:
        """Every real conversion (the table's ``freezes``): not the casts."""
        scheme = _scheme(config)
        return scheme is not None and scheme.freezes

    @classmethod
    def check(cls, config: StageConfig, device: str, earlier: Sequence[StageConfig] = ()) -> list[str]:
        """A scheme not available on the recipe's device."""
        scheme = _scheme(config)
        problem = scheme.device_problem(device) if scheme is not None else None
        if problem and getattr(config, "scheme", "") == AUTO:
            problem = f"scheme auto chooses among CPU runtimes; set device: cpu (recipe device: {device})"
        return [problem] if problem else []

    def _device_problem(self, state: State) -> None:
        problem = _scheme(self.config).device_problem(str(state.device), at_run=True)  # type: ignore[union-attr]
        if problem and self.config.scheme == AUTO:
            problem = (
                f"scheme auto chooses among CPU runtimes; run with --device cpu (running on {state.device})"
            )
        if problem:
            raise StageError(problem)

    def _auto_runtimes(self) -> list[str]:
        """``target.runtimes``, each installed, or the installed ones."""
        from compress_cli.quantization.auto import installed_runtimes, missing_runtime

        target = self.config.target
        if target is None or target.runtimes is None:
            return installed_runtimes()
        for r in target.runtimes:
            lack = missing_runtime(r)
            if lack:
                how = "pip install 'compress-cli[openvino]'" if r == "openvino" else f"pip install {lack}"
                raise StageError(
                    f"target.runtimes: {r} needs {lack}, which is not installed ({how}), "
                    f"or drop {r} from target.runtimes"
                )
        return list(dict.fromkeys(target.runtimes))

    def preflight(self, state: State) -> None:
        """The scheme's trial conversion of a throwaway copy of the model on one small example
        batch (export, prepare, convert, build the runtime as load() would): what would fail after
        the baseline fails here, with the reason and the recipe keys that change it. ``auto``:
        the target's runtimes are installed (a failing candidate is a row of its table)."""
        from compress_cli.quantization import handler

        self._device_problem(state)
        if self.config.scheme == AUTO:
            self._auto_runtimes()
            return
        from compress_cli.quantization.budget import gate_options

        handler(self.config.scheme).preflight(state, gate_options(self.config))

    def preview(self, state: State) -> list[str]:
        """The layers the scheme would convert (auto: the candidates)."""
        from torch import nn

        if self.config.scheme == AUTO:
            from compress_cli.quantization.auto import candidate_name, candidate_schemes

            found = candidate_schemes(state.model, self._auto_runtimes())
            names = [candidate_name(s, p) for s, _, p in found]
            return [f"auto: candidates {', '.join(names)}"]
        kinds = tuple(getattr(nn, name) for name in SCHEMES[self.config.scheme].layers)
        skip = {n for n, _ in state.select_modules(self.config.exclude)} if self.config.exclude else set()
        mods = [n for n, _ in state.select_modules(kinds=kinds) if n not in skip]
        more = " ..." if len(mods) > 8 else ""
        return [f"{self.config.scheme}: {len(mods)} layer(s): {', '.join(mods[:8])}{more}"]

    def run(self, state: State) -> StageResult:
        """Check the device, then :func:`compress_cli.quantization.quantize` (``auto``:
        :func:`compress_cli.quantization.auto.choose`)."""
        from compress_cli.quantization import quantize

        self._device_problem(state)
        state.ctx.listener.on_message(f"quantize: {self.config.scheme}")
        if self.config.scheme == AUTO:
            from compress_cli.quantization.auto import DEFAULT_BUDGET, choose

            lat = state.recipe.measure.latency
            target = self.config.target
            batch = (
                target.batch if target is not None and target.batch else (lat.batch_sizes[0] if lat else 1)
            )
            budget = self.config.max_accuracy_drop
            done = choose(
                state,
                self.config,
                self.name,
                runtimes=self._auto_runtimes(),
                batch=batch,
                budget=DEFAULT_BUDGET if budget is None else budget,
                threads=lat.threads if lat is not None else None,
            )
            return StageResult(
                notes=done.notes, details=done.details, artifacts=done.artifacts, violations=done.violations
            )
        done = quantize(state, self.config, self.name)
        return StageResult(
            notes=done.notes, details=done.details, artifacts=done.artifacts, violations=done.violations
        )
