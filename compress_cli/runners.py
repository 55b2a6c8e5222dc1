"""How a model is executed for measurement: torch eager by default; stages that convert the model
for a faster runtime (torch.compile, ONNX Runtime) put their own runner in ``state.runner`` so the
pipeline measures the model where it will be deployed. Every reported number names its runtime."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn


class Runner:
    """Callable on a CPU batch, returns logits (on CPU or the run device)."""

    runtime = "torch-eager"

    def __init__(self, model: nn.Module, device: torch.device):
        self.model = model
        self.device = device

    def prepare(self) -> None:
        self.model.eval()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.inference_mode():
            return self.model(x.to(self.device, non_blocking=True))

    def input_device(self) -> torch.device:
        return self.device

    def describe(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "device": str(self.device)}


class EagerRunner(Runner):
    runtime = "torch-eager"


class CompiledRunner(Runner):
    """``torch.compile`` of the model (compiled once, lazily)."""

    runtime = "torch-compiled"

    def __init__(self, model: nn.Module, device: torch.device, compiled: Any = None, **compile_kw: Any):
        super().__init__(model, device)
        self._compiled = compiled
        self._kw = compile_kw

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        if self._compiled is None:
            self._compiled = torch.compile(self.model, **self._kw)
        with torch.inference_mode():
            return self._compiled(x.to(self.device, non_blocking=True))
