from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..registry import register_stage
from ..stage import Stage, StageConfig, StageResult
from ..state import State


class ExportConfig(StageConfig):
    """Export the current model for deployment."""

    formats: list[Literal["onnx", "torch_export", "torchscript"]] = Field(
        default_factory=lambda: ["onnx"], min_length=1, description="files to write (torchscript is deprecated upstream)"
    )
    opset: int = Field(18, ge=11, le=23, description="ONNX opset version")
    exporter: Literal["auto", "dynamo", "legacy"] = Field(
        "auto", description="ONNX exporter: torch's dynamo-based one, the TorchScript-based one, or dynamo then legacy"
    )
    dynamic_batch: bool = Field(True, description="let the batch dimension vary in the exported file")
    tolerance: float = Field(1e-3, gt=0, description="max |exported - PyTorch| allowed on a check batch (fp32 models)")
    directory: str = Field("export", description="folder inside the output directory")


@register_stage("export")
class Export(Stage[ExportConfig]):
    """Write ONNX / torch.export / TorchScript files, check them against PyTorch, time them."""

    example = {"formats": ["onnx", "torch_export"], "exporter": "legacy"}

    @classmethod
    def modifies(cls, config: StageConfig) -> bool:
        return False

    def run(self, state: State) -> StageResult:
        from ..export import (
            export_onnx,
            export_torch,
            export_torchscript,
            max_abs_diff,
            median_latency_ms,
            ort_callable,
            ort_session,
        )

        cfg = self.config
        model = _plain_model(state)
        folder = state.output_dir / cfg.directory
        example = state.data.example_input(2).to(state.device)
        check = state.data.example_input(5).to(state.device)  # another batch size: the dynamic axis works
        x1 = state.data.example_input(1)
        files: dict[str, dict] = {}
        for fmt in cfg.formats:
            state.emit("message", text=f"export {fmt}")
            if fmt == "onnx":
                path = folder / "model.onnx"
                used = export_onnx(model.cpu(), example.cpu(), path, opset=cfg.opset, dynamic_batch=cfg.dynamic_batch,
                                   exporter=cfg.exporter)
                fn = ort_callable(ort_session(path))
                info = {"exporter": used, "runtime": "onnxruntime"}
            elif fmt == "torch_export":
                path = folder / "model.pt2"
                ep = export_torch(model, example, path, cfg.dynamic_batch)
                fn = ep.module()
                info = {"runtime": "torch-export"}
            else:
                path = folder / "model.ts"
                fn = export_torchscript(model, example, path)
                info = {"runtime": "torchscript"}
            batch = check if cfg.dynamic_batch else example
            diff = max_abs_diff(fn, model, batch.cpu() if fmt == "onnx" else batch)
            if diff > cfg.tolerance:
                from ..errors import StageError

                raise StageError(f"{fmt}: exported model differs from PyTorch by {diff:.3g} (tolerance {cfg.tolerance})")
            info.update(path=str(path), size_bytes=path.stat().st_size, max_abs_diff=diff,
                        latency_ms=median_latency_ms(fn, x1 if fmt == "onnx" else x1.to(state.device)))
            files[fmt] = info
            model.to(state.device)
        notes = ", ".join(f"{k} {v['size_bytes'] / 1024:.0f} KB {v['latency_ms']:.2f} ms" for k, v in files.items())
        return StageResult(notes=notes, details={"files": files}, artifacts=[v["path"] for v in files.values()])


def _plain_model(state: State):
    """The model with unstructured-pruning reparametrisations folded (exporters need plain weights)."""
    from ..checkpoint import copy_model

    model = state.model
    if any(k.endswith("_orig") for k in model.state_dict()):
        model = copy_model(model)
        import torch.nn.utils.prune as P

        for m in model.modules():
            for name in [n[: -len("_orig")] for n, _ in list(m.named_parameters(recurse=False)) if n.endswith("_orig")]:
                P.remove(m, name)
    return model.eval()
