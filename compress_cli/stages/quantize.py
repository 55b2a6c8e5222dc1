from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, model_validator

from compress_cli.checkpoint import register_restore, register_transform
from compress_cli.errors import StageError
from compress_cli.stages.base import Stage, StageConfig, StageResult
from compress_cli.stages.registry import register_stage
from compress_cli.state import State
from compress_cli.training import TrainOptions

SCHEMES = (
    "int8_dynamic",
    "int8_static",
    "qat",
    "onnxruntime_int8",
    "int8_weight_only",
    "int4_weight_only",
    "fp16",
    "bf16",
)
_CPU_INT8 = ("int8_dynamic", "int8_static", "qat", "onnxruntime_int8")
_CUDA_ONLY = ("int8_weight_only", "int4_weight_only")
_CALIBRATED = ("int8_static", "onnxruntime_int8")
_PT2E = ("int8_static", "qat")
#: option -> schemes it applies to (setting it for another scheme is a validation error)
_APPLIES: dict[str, tuple[str, ...]] = {
    "calibration_batches": _CALIBRATED,
    "reduce_range": ("int8_static", "qat", "onnxruntime_int8"),
    "min_sqnr_db": _CPU_INT8,
    "exclude": _CPU_INT8,
    "compile": _PT2E,
    "backend": ("int8_static",),
    "calibrate_method": ("onnxruntime_int8",),
    "opset": ("onnxruntime_int8",),
    "exporter": ("onnxruntime_int8",),
    "group_size": ("int4_weight_only",),
    **dict.fromkeys(TrainOptions.model_fields, ("qat",)),
}
_WHY_CUDA = (
    "runs on CUDA only: torchao's weight-only kernels are CUDA kernels; on CPU its int8 configs ran "
    "0.2-0.7x (slower than fp32), Conv2d layers are not supported, and int4 needs CUDA (tinygemm) kernels. "
    "On CPU use int8_static, onnxruntime_int8 or int8_dynamic"
)


class QuantizeConfig(StageConfig, TrainOptions):
    """Quantize the model; ``scheme`` chooses what and for which runtime (see the stage docstring).

    The training options (epochs, lr, ...) apply to ``qat`` only; its default is one short epoch."""

    scheme: Literal[
        "int8_dynamic",
        "int8_static",
        "qat",
        "onnxruntime_int8",
        "int8_weight_only",
        "int4_weight_only",
        "fp16",
        "bf16",
    ] = Field(
        description="int8_dynamic | int8_static | qat | onnxruntime_int8 | int8_weight_only | int4_weight_only | fp16 | bf16"
    )
    calibration_batches: int | None = Field(
        None,
        gt=0,
        le=10_000,
        description="training batches used to calibrate activation ranges (default: data.calibration_batches)",
    )
    reduce_range: bool | None = Field(
        None,
        description="7-bit activations; unset: chosen from the CPU (on for x86 without VNNI/AMX, avoids int16 saturation)",
    )
    min_sqnr_db: float = Field(
        20.0,
        ge=0,
        le=100,
        description="refuse the result when the int8 logits' SQNR against fp32 is below this (dB)",
    )
    exclude: list[str] = Field(
        default_factory=list, description="module name globs to keep in floating point"
    )
    compile: bool = Field(
        True,
        description="int8_static/qat: run through torch.compile (inductor, freezing); false = converted graph in eager, 2-3x slower than fp32",
    )
    backend: Literal["pt2e", "fx"] | None = Field(
        None,
        description="int8_static: pt2e (torchao, compiled) or fx (torch.ao, deprecated upstream, eager); unset: pt2e when torchao is installed",
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
    group_size: int = Field(
        128, ge=16, le=1024, description="int4_weight_only: weights per scale along the input dimension"
    )

    @model_validator(mode="after")
    def _options_match_scheme(self) -> QuantizeConfig:
        fields = type(self).model_fields
        wrong = [  # a default value written back (recipe.yaml as run) is not an error
            k
            for k in sorted(self.model_fields_set)
            if k in _APPLIES
            and self.scheme not in _APPLIES[k]
            and getattr(self, k) != fields[k].get_default(call_default_factory=True)
        ]
        if wrong:
            k = wrong[0]
            raise ValueError(
                f"{', '.join(wrong)}: not an option of scheme {self.scheme} ({k} applies to {', '.join(_APPLIES[k])})"
            )
        if self.group_size & (self.group_size - 1):
            raise ValueError(f"group_size must be a power of two (got {self.group_size})")
        return self


@register_stage("quantize")
class Quantize(Stage[QuantizeConfig]):
    """Quantize the model for a real runtime: int8 on CPU (torch.ao dynamic, torchao PT2E static/QAT
    compiled by inductor, ONNX Runtime QDQ), torchao weight-only int8/int4 on CUDA, fp16/bf16 casts.

    int8 results are checked against fp32 (logit SQNR) before they are accepted; the model is then
    measured in the runtime it was converted for (``state.runner``), and nothing may train after a
    real int8 conversion. The checkpoint stores the weights snapped to the int8 grid (8 bits each
    after the palette encoding) plus the quantization parameters; ``compress_cli.load()`` rebuilds
    the same runtime module (see compress_cli/quantization/core.py for what each scheme returns).
    """

    example = {"scheme": "int8_dynamic"}

    @classmethod
    def trains(cls, config: StageConfig) -> bool:
        return getattr(config, "scheme", None) == "qat"

    @classmethod
    def freezes(cls, config: StageConfig) -> bool:
        return getattr(config, "scheme", None) in _CPU_INT8 + _CUDA_ONLY

    @classmethod
    def check(cls, config: StageConfig, device: str, earlier: Sequence[StageConfig] = ()) -> list[str]:
        scheme = getattr(config, "scheme", None)
        if scheme in _CUDA_ONLY and device in ("cpu", "mps"):
            return [f"scheme {scheme} {_WHY_CUDA} (recipe device: {device})"]
        if scheme in _CPU_INT8 and (device.startswith("cuda") or device == "mps"):
            return [
                f"scheme {scheme} makes a CPU int8 model (x86/ONNX Runtime CPU kernels) and is measured on CPU; "
                f"set device: cpu (recipe device: {device}), or use int8_weight_only on CUDA"
            ]
        return []

    def preview(self, state: State) -> list[str]:
        from torch import nn

        kinds: tuple[type, ...] = (
            (nn.Linear, nn.LSTM)
            if self.config.scheme == "int8_dynamic"
            else (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
        )
        skip = {n for n, _ in state.select_modules(self.config.exclude)} if self.config.exclude else set()
        mods = [n for n, _ in state.select_modules(kinds=kinds) if n not in skip]
        return [
            f"{self.config.scheme}: {len(mods)} layer(s): {', '.join(mods[:8])}{' ...' if len(mods) > 8 else ''}"
        ]

    # ------------------------------------------------------------------ run
    def run(self, state: State) -> StageResult:
        import torch

        scheme = self.config.scheme
        if scheme in _CUDA_ONLY and state.device.type != "cuda":
            raise StageError(f"scheme {scheme} {_WHY_CUDA} (running on {state.device})")
        if scheme in _CPU_INT8 and state.device.type != "cpu":
            raise StageError(
                f"scheme {scheme} makes a CPU int8 model; run with --device cpu (running on {state.device})"
            )
        state.ctx.listener.on_message(f"quantize: {scheme}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(state.seed)
            if scheme in ("fp16", "bf16"):
                return self._cast(state)
            if scheme in _CUDA_ONLY:
                return self._weight_only(state)
            return self._int8(state)

    def _backend(self) -> str:
        from compress_cli.quantization import core as quant

        if self.config.backend is not None:
            return self.config.backend
        try:
            quant._pt2e()
        except StageError:
            return "fx" if quant.fx_available() else "pt2e"
        return "pt2e"

    def _excluded(self, state: State) -> list[str]:
        if not self.config.exclude:
            return []
        return [n for n, _ in state.select_modules(self.config.exclude)]

    def _calibration(self, state: State) -> list[Any]:
        n = self.config.calibration_batches or state.data.calibration_batches
        batches = [x for x, _ in state.data.calibration()][:n]
        if len(batches) < n:
            batches = []
            for i, (x, _) in enumerate(state.data.loader("train", shuffle=False)):
                if i >= n:
                    break
                batches.append(x)
        if not batches:
            raise StageError("no calibration data: the training split is empty")
        return [b.cpu().float() for b in batches]

    def _cast(self, state: State) -> StageResult:
        from compress_cli.quantization import core as quant

        entry = {"type": "quantize", "scheme": self.config.scheme}
        quant.rebuild(state.model, entry)
        state.transforms.append(entry)
        state.edits.record(self.name, op="quantize", scheme=self.config.scheme)
        note = f"weights and activations cast to {self.config.scheme}; inputs cast on entry, logits returned as fp32"
        if self.config.scheme == "fp16" and state.device.type == "cpu":
            note += (
                "; fp16 on CPU is fast only with AVX512-FP16/AMX-FP16 and may be slower than fp32 or fail "
                "for some convolutions elsewhere (bf16 is the CPU half-precision choice)"
            )
        return StageResult(notes=note, details={"scheme": self.config.scheme, "runtime": "torch-eager"})

    def _weight_only(self, state: State) -> StageResult:
        from compress_cli.quantization import core as quant

        entry: dict[str, Any] = {"type": "quantize", "scheme": self.config.scheme}
        if self.config.scheme == "int4_weight_only":
            entry["group_size"] = self.config.group_size
        runtime = quant.rebuild(state.model, entry, device=state.device)
        state.transforms.append(entry)
        state.runner = make_runner(runtime, entry, state)
        state.edits.record(self.name, op="quantize", scheme=self.config.scheme)
        return StageResult(
            notes=f"torchao {self.config.scheme} on {state.device} (the checkpoint keeps fp32 weights; load() re-quantizes them)",
            details={"scheme": self.config.scheme, "runtime": "torch-eager", "device": str(state.device)},
        )

    def _int8(self, state: State) -> StageResult:
        import copy

        import torch

        from compress_cli.quantization import core as quant

        cfg = self.config
        scheme = cfg.scheme
        reference = quant.strip_pruning(state.model).cpu().eval()

        def check_batch() -> Any:
            return next(iter(state.data.loader("val")))[0].cpu().float()

        # the int8 logits must follow fp32 on a validation batch (SQNR check below); the fp32 logits
        # are taken now, so the conversion works on this one copy (qat: after fine-tuning)
        if scheme != "qat":
            x = check_batch()
            with torch.inference_mode():
                y_ref = reference(x)
        exclude = self._excluded(state)
        if cfg.reduce_range is None:
            reduce_range, why = quant.choose_reduce_range()
        else:
            reduce_range, why = bool(cfg.reduce_range), "set in the recipe"
        shape = list(state.data.input_shape)
        entry: dict[str, Any] = {
            "type": "quantize",
            "scheme": scheme,
            "exclude": exclude,
            "input_shape": shape,
        }
        details: dict[str, Any] = {"scheme": scheme}
        artifacts: list[str] = []
        if scheme == "int8_dynamic":
            model = copy.deepcopy(reference)
            layers = quant.snap_dynamic_weights_(model, quant.dynamic_quantize(reference, exclude))
            if not layers:
                raise StageError(
                    "int8_dynamic found no Linear/LSTM layer to quantize (convolutions need int8_static or onnxruntime_int8)"
                )
            details["layers"] = layers
        else:
            model, folded = quant.fold_batchnorm(reference, inplace=True)
            del reference  # now `model`
            details["folded_batchnorm"] = folded
            details["reduce_range"] = reduce_range
            details["reduce_range_reason"] = why
            entry["reduce_range"] = reduce_range
            fx = scheme == "int8_static" and self._backend() == "fx"
            if scheme == "int8_static":
                batches = self._calibration(state)
                details["calibration_batches"] = len(batches)
                state.ctx.listener.on_message(f"calibrating on {len(batches)} batch(es)")
                calibrate = quant.fx_calibrate if fx else quant.pt2e_calibrate
                entry["qparams"] = calibrate(model, batches, reduce_range, exclude)
            elif scheme == "qat":
                entry["qparams"], details["training"] = self._qat(state, model, reduce_range, exclude)
                x = check_batch()
                with torch.inference_mode():
                    y_ref = model.eval()(x)  # the fine-tuned fp32 weights, before snapping
            if fx:
                details["quantized_weights"] = quant.snap_fx_weights_(model, exclude)
                details["backend"] = entry["backend"] = "fx"
            elif scheme in ("int8_static", "qat"):
                details["quantized_weights"] = quant.snap_pt2e_weights_(model, entry["qparams"])
                details["backend"] = quant._pt2e().where
                entry["compile"] = cfg.compile
            else:  # onnxruntime_int8
                self._onnxruntime(state, model, reduce_range, entry, details)
        runtime = quant.rebuild(model, entry)
        if isinstance(runtime, quant.OrtModule):
            path = state.ctx.output_dir / "model.onnx"
            runtime.save(path)
            artifacts.append(str(path))
            details["onnx_file"] = str(path)
            details["onnx_bytes"] = len(runtime.onnx_bytes)
        runner = make_runner(runtime, entry, state)
        # accept the result only if the int8 logits follow fp32 (catches e.g. int16 saturation)
        with torch.inference_mode():
            runner.prepare()
            y = runner(x)
        sqnr = quant.sqnr_db(y_ref, y)
        details["sqnr_db"] = sqnr
        details["min_sqnr_db"] = cfg.min_sqnr_db
        details["runtime"] = runner.runtime
        if sqnr < cfg.min_sqnr_db:
            raise StageError(
                f"{scheme}: int8 logits are too far from fp32 (SQNR {sqnr:.1f} dB < min_sqnr_db {cfg.min_sqnr_db}); "
                f"reduce_range={reduce_range} ({why}); try reduce_range: true, more calibration_batches, "
                "or exclude the most sensitive layers"
            )
        state.model = model
        state.transforms.append(entry)
        state.runner = runner
        state.edits.record(self.name, op="quantize", scheme=scheme, reduce_range=entry.get("reduce_range"))
        notes = f"{scheme} -> {runner.runtime}, logit SQNR {sqnr:.1f} dB"
        if "reduce_range" in entry:
            notes += f", reduce_range={'on' if reduce_range else 'off'}"
        return StageResult(notes=notes, details=details, artifacts=artifacts)

    def _onnxruntime(
        self, state: State, model: Any, reduce_range: bool, entry: dict[str, Any], details: dict[str, Any]
    ) -> None:
        """ONNX Runtime static int8 on ``model``'s ONNX export: snaps ``model``'s weights to the grid
        ORT chose and records its scales in ``entry`` (load() rebuilds the same graph from them)."""
        import tempfile
        from pathlib import Path

        import torch

        from compress_cli.quantization import core as quant

        cfg = self.config
        batches = self._calibration(state)
        details["calibration_batches"] = len(batches)
        with tempfile.TemporaryDirectory(prefix="compress-onnx-") as d:
            # the fp32 ONNX (the model's size) waits on disk while ONNX Runtime quantizes it
            fp32 = Path(d) / "fp32.onnx"
            exporter = quant.export_onnx_file(model, entry["input_shape"], fp32, cfg.opset, cfg.exporter)
            nodes = quant.onnx_nodes_for_modules(fp32, entry["exclude"])
            q = quant.ort_quantize(
                fp32, quant.calibration_arrays(batches), reduce_range, cfg.calibrate_method, nodes
            )
            params, snapped = quant.ort_record(q)
            del q
            sd = model.state_dict()
            where = {k: (k, False) for k in snapped if k in sd}
            where.update(quant.initializer_sources(fp32, [k for k in snapped if k not in sd], sd))
        # constants the exporter derived from parameters (e.g. Swin's gathered relative-position
        # bias) have no state-dict key: they stay fp32 in the checkpoint, and load() derives and
        # quantizes them again with the recorded scales, exactly as here
        derived = [k for k in snapped if k not in where]
        if derived:
            details["derived_constants"] = len(derived)
        with torch.no_grad():
            for k, v in snapped.items():
                if k not in where:
                    continue
                key, transposed = where[k]
                t = torch.from_numpy(v)
                sd[key].copy_(t.T if transposed else t.reshape(sd[key].shape))
        details["quantized_tensors"] = len(snapped)
        entry.update(onnx_qparams=params, opset=cfg.opset, exporter=exporter, exclude_nodes=nodes)

    def _qat(
        self, state: State, model: Any, reduce_range: bool, exclude: list[str]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Fake-quant fine-tuning of ``model`` (BN already folded) through the shared loop, its fp32
        weights copied back into ``model``; returns the qparams and the training summary."""
        import torch

        from compress_cli.quantization import core as quant
        from compress_cli.training import train

        example = next(iter(state.data.loader("train", shuffle=False)))[0][:2].cpu().float()
        graph = quant.prepare_qat(model, example, reduce_range, exclude)
        res = train(graph, state, self.config, label=self.name)
        graph.eval()
        quant.copy_trained_(graph, model)
        with quant.quiet(), torch.no_grad():
            qparams = quant.record_qparams(graph)
        return qparams, res.summary()


def measure_threads(state: State) -> int:
    import torch

    lat = state.recipe.measure.latency
    return lat.threads if lat is not None and lat.threads else torch.get_num_threads()


def make_runner(runtime: Any, entry: dict[str, Any], state: State) -> Any:
    """The runner that measures ``runtime`` where it is deployed (stage and snapshot restore)."""
    import torch

    from compress_cli.runtime.runners import CompiledRunner, EagerRunner, OrtRunner

    scheme = entry["scheme"]
    if scheme == "onnxruntime_int8":
        runtime.threads = measure_threads(state)  # measurement threads (load() leaves ORT's default)
        return OrtRunner(runtime, runtime.threads)
    if scheme in _PT2E and entry.get("compile", True) and entry.get("backend") != "fx":
        return CompiledRunner(runtime, torch.device("cpu"), compiled=runtime, frozen=True)
    if scheme in _CUDA_ONLY:
        return EagerRunner(runtime, state.device)
    return EagerRunner(runtime, torch.device("cpu"))


@register_restore("quantize")
def _restore_quantized(state: State, entry: dict[str, Any]) -> None:
    """--resume / revert: rebuild the runtime from the stored (snapped) module, as the stage did."""
    from compress_cli.quantization import core as quant

    runtime = quant.rebuild(state.model, entry, device=state.device)
    state.runner = None if entry["scheme"] in ("fp16", "bf16") else make_runner(runtime, entry, state)


@register_transform("quantize")
def _load_quantized(model: Any, entry: dict[str, Any], state_dict: Any) -> Any:
    """load(): rebuild the runtime module the report measured (see compress_cli.quantization.core.rebuild)."""
    from compress_cli.quantization import core as quant

    return quant.rebuild(model, entry)
