"""The ``export`` stage: deployment files of the model the report measured, checked and timed."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from compress_cli.stages.base import Stage, StageConfig, StageResult
from compress_cli.stages.registry import register_stage
from compress_cli.state import State

Format = Literal["onnx", "torch_export", "torchscript", "openvino"]


def _onnx() -> list[Format]:
    return ["onnx"]


class ExportConfig(StageConfig):
    """Export the current model for deployment."""

    formats: list[Format] = Field(
        default_factory=_onnx, min_length=1, description="files to write (torchscript is deprecated upstream)"
    )
    opset: int = Field(18, ge=11, le=23, description="ONNX opset version")
    exporter: Literal["auto", "dynamo", "legacy"] = Field(
        "auto",
        description="ONNX exporter: torch's dynamo-based one, the TorchScript-based one, "
        "or dynamo then legacy",
    )
    dynamic_batch: bool = Field(
        True,
        description="let the batch dimension (and token inputs' sequence length) vary in the exported file",
    )
    tolerance: float = Field(
        1e-3, gt=0, le=1e6, description="max |exported - PyTorch| allowed on a check batch"
    )
    relative_tolerance: float = Field(
        0.02,
        ge=0,
        le=10,
        description="quantized or cast models: extra allowance, times max |logit| of the reference "
        "(the runtime the report measured); an int8 rounding step is about 0.4% of the logit range",
    )
    directory: str = Field("export", description="folder inside the output directory")


#: the allowance for float32 roundoff on an unquantized model, times max |logit| of the reference
FP32_RELATIVE = 1e-5


@register_stage("export")
class Export(Stage[ExportConfig]):
    """
    Write ONNX / torch.export / TorchScript / OpenVINO IR files, check them against what the report
    measured, time them.

    After a quantize stage the quantized model is exported, in the formats its runtime has: ONNX
    Runtime int8 -> onnx, OpenVINO int8 / fp32 -> openvino, PT2E int8 -> torch_export, torch.ao
    dynamic int8 -> torchscript,
    fp16/bf16 -> all. Other combinations are refused at validation (``compress validate``), with
    the reason."""

    example = {"formats": ["onnx", "torch_export"], "exporter": "legacy"}

    @classmethod
    def modifies(cls, config: StageConfig) -> bool:
        return False

    @classmethod
    def check(cls, config: StageConfig, device: str, earlier: Sequence[StageConfig] = ()) -> list[str]:
        from compress_cli.quantization.schemes import unsupported_formats

        quant = next((c for c in reversed(earlier) if c.type == "quantize"), None)
        return unsupported_formats(
            list(getattr(config, "formats", [])),
            getattr(quant, "scheme", None),
            getattr(quant, "backend", None),
        )

    def run(self, state: State) -> StageResult:
        """Write each format, check it against what the report measured on two batch sizes (and,
        for token inputs, two sequence lengths), time it at batch 1."""
        from compress_cli._utils.batches import to_device
        from compress_cli.errors import StageError
        from compress_cli.quantization.schemes import unsupported_formats
        from compress_cli.runtime.export import max_abs_diff, median_latency_ms
        from compress_cli.runtime.inputs import InputSpec

        cfg = self.config
        entry = next((t for t in reversed(state.transforms) if t.get("type") == "quantize"), None)
        scheme = entry["scheme"] if entry else None
        refused = unsupported_formats(list(cfg.formats), scheme, entry.get("backend") if entry else None)
        if refused:
            raise StageError("; ".join(refused))
        model = _plain_model(state)
        # the reference is what the report measured: the int8 runtime where there is one
        reference = state.runner if state.runner is not None else model
        cpu = state.runner is not None or state.device.type == "cpu"
        folder = state.ctx.output_dir / cfg.directory
        example = state.data.example_input(2)
        spec = InputSpec.from_example(example, model)
        x1 = state.data.example_input(1)
        checks = [example]
        if cfg.dynamic_batch:  # other batch sizes (and sequence lengths): the dynamic axes work
            checks = [state.data.example_input(5)]
            seq = spec.sequence_length
            if seq is not None and seq > 1:
                checks.append(spec.with_length(state.data.example_input(3), max(1, seq // 2)))
        files: dict[str, dict] = {}
        for fmt in cfg.formats:
            state.ctx.listener.on_message(f"export {fmt}")
            path, fn, info = self._write(
                fmt, state, model, entry, folder, example if cpu else to_device(example, state.device)
            )
            on_device = not cpu and fmt != "onnx"
            diff, scale = 0.0, 0.0
            for batch in checks:
                d, s = max_abs_diff(fn, reference, to_device(batch, state.device) if on_device else batch)
                diff, scale = max(diff, d), max(scale, s)
            # float32 roundoff grows with the outputs' size: a fp32 model whose logits reach 1e14
            # (mobileone_s0 at random init, its branches summed unnormalised) differs from its
            # ONNX file by ~1e6 through reordered sums alone; a real export mistake is of the
            # order of the logits themselves
            limit = cfg.tolerance + (cfg.relative_tolerance if scheme else FP32_RELATIVE) * scale
            if diff > limit:
                raise StageError(
                    f"{fmt}: exported model differs from what the report measured by {diff:.3g} "
                    f"(allowed {limit:.3g})"
                )
            info.update(
                path=str(path),
                size_bytes=path.stat().st_size,
                max_abs_diff=diff,
                latency_ms=median_latency_ms(fn, to_device(x1, state.device) if on_device else x1),
            )
            if fmt == "onnx":
                info.update(onnx_interface(fn.session))
            elif fmt == "openvino":
                info["inputs"] = spec.describe()
                info["size_bytes"] += path.with_suffix(".bin").stat().st_size
            else:
                info["inputs"] = spec.describe()
            if scheme:
                info["quantization"] = scheme
            files[fmt] = info
            model.to(state.device)
        notes = ", ".join(
            f"{k} {v['size_bytes'] / 1024:.0f} KB {v['latency_ms']:.2f} ms" for k, v in files.items()
        )
        return StageResult(
            notes=notes,
            details={"files": files},
            artifacts=[p for v in files.values() for p in (v["path"], v.get("bin")) if p],
        )

    def _write(
        self, fmt: str, state: State, model: Any, entry: dict[str, Any] | None, folder: Path, example: Any
    ) -> tuple[Path, Any, dict[str, Any]]:
        """Write one format; returns (file, a callable running it, report details). After quantize,
        the scheme's handler may give what to write instead of the plain model (e.g. the int8 graph)."""
        from compress_cli._utils.batches import to_device
        from compress_cli._utils.io import atomic_write_bytes
        from compress_cli.quantization.schemes import handler
        from compress_cli.runtime.export import export_torch, export_torchscript, write_onnx
        from compress_cli.runtime.ort import OrtModule

        cfg = self.config
        source, extra = handler(entry["scheme"]).export_model(fmt, state, entry) if entry else (None, {})
        if fmt == "onnx":
            path = folder / "model.onnx"
            if source is not None:  # a graph that exists only as ONNX, as the runner measured it
                atomic_write_bytes(path, source)
            else:
                extra = {
                    "exporter": write_onnx(
                        model.cpu(),
                        to_device(example, "cpu"),
                        path,
                        opset=cfg.opset,
                        dynamic_batch=cfg.dynamic_batch,
                        exporter=cfg.exporter,
                    )
                }
            return path, OrtModule(path.read_bytes()), {**extra, "runtime": "onnxruntime"}
        if fmt == "openvino":
            from compress_cli.runtime.openvino import OvModule, ov_convert

            path = folder / "model.xml"
            if source is None:  # the plain model, converted on the example
                source = OvModule(ov_convert(model.cpu(), to_device(example, "cpu"))[0])
                extra = {"converter": "openvino.convert_model"}
            source.save(path)
            return (
                path,
                OvModule.from_file(path),
                {**extra, "runtime": "openvino", "bin": str(path.with_suffix(".bin"))},
            )
        if fmt == "torch_export":
            path = folder / "model.pt2"
            ep = export_torch(model if source is None else source, example, path, cfg.dynamic_batch)
            return path, ep.module(), {"runtime": "torch-export", **extra}
        path = folder / "model.ts"
        ts = export_torchscript(model if source is None else source, example, path)
        return path, ts, {"runtime": "torchscript", **extra}


def onnx_interface(session: Any) -> dict[str, Any]:
    """The ONNX file's inputs and outputs as the report shows them: name -> type and shape, the
    dynamic axes by name (``batch``, ``sequence``)."""

    def one(v: Any) -> dict[str, Any]:
        return {"type": v.type, "shape": list(v.shape)}

    return {
        "inputs": {i.name: one(i) for i in session.get_inputs()},
        "outputs": {o.name: one(o) for o in session.get_outputs()},
    }


def _plain_model(state: State) -> Any:
    """The model with unstructured-pruning reparametrisations folded (exporters need plain weights)."""
    from compress_cli.pruning import permanent_copy

    model = state.model
    if any(k.endswith("_orig") for k in model.state_dict()):
        model = permanent_copy(model)
    return model.eval()
