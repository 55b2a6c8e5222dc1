"""How a model is executed for measurement: torch eager by default; stages that convert the model
for a faster runtime (torch.compile, ONNX Runtime) put their own runner in ``state.runner`` so the
pipeline measures the model where it will be deployed. Every reported number names its runtime."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn


class Runner:
    """Callable on a CPU batch of model inputs (a tensor, tuple or dict: see
    :mod:`compress_cli._utils.batches`), returns what the model returns (on CPU or the run device)."""

    runtime = "torch-eager"

    def __init__(self, model: nn.Module, device: torch.device):
        self.model = model
        self.device = device

    def prepare(self) -> None:
        """Get ready outside the timed region (eval mode; a session or a compilation where lazy)."""
        self.model.eval()

    def __call__(self, x: Any) -> Any:
        import torch

        from compress_cli._utils.batches import call, to_device

        with torch.inference_mode():
            return call(self.model, to_device(x, self.device, non_blocking=True))

    def input_device(self) -> torch.device:
        """Where the batches it is called on should be."""
        return self.device

    def describe(self) -> dict[str, Any]:
        """How it runs, for the report (runtime, device, and runtime-specific settings)."""
        return {"runtime": self.runtime, "device": str(self.device)}


class FrozenCompiled:
    """``torch.compile(model, dynamic=False)`` whose compilations run with inductor's ``freezing``
    (weights become constants, so int8 weights are pre-packed for oneDNN). The flag is switched on
    only around the first call at each input shape (when dynamo compiles), not for the process.

    (``torch.compile(options={"freezing": True})`` is not equivalent in torch 2.14: the quantized
    conv lowering then fails with "UnsupportedOperatorException: onednn.qconv_prepack".)"""

    def __init__(self, model: Any):
        import torch

        self.model = model
        self.compiled = torch.compile(model, dynamic=False)
        self.seen: set[tuple[Any, ...]] = set()

    def __call__(self, x: Any) -> Any:
        import torch

        from compress_cli._utils.batches import call, tensors

        shapes = tuple((t.shape, t.dtype) for t in tensors(x))
        key = (shapes, torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        if key in self.seen:
            return call(self.compiled, x)
        import torch._inductor.config as ic

        from compress_cli._utils.quiet import quiet

        with ic.patch(freezing=True), quiet():
            out = call(self.compiled, x)
        self.seen.add(key)
        return out


class EagerRunner(Runner):
    """The module called as it is, in PyTorch eager mode."""

    runtime = "torch-eager"


class CompiledRunner(Runner):
    """``torch.compile`` of the model (compiled once, lazily), or a ``compiled`` callable given.

    ``compile_kw`` also compiles the original model for :meth:`same_runtime_baseline`;
    ``frozen=True`` compiles as :class:`FrozenCompiled` does (inductor freezing, static shapes)."""

    runtime = "torch-compiled"

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        compiled: Any = None,
        frozen: bool = False,
        **compile_kw: Any,
    ):
        super().__init__(model, device)
        self._compiled = compiled
        self._frozen = frozen
        self._kw = compile_kw

    def __call__(self, x: Any) -> Any:
        import torch

        from compress_cli._utils.batches import call, to_device

        if self._compiled is None:
            if self._frozen:
                self._compiled = FrozenCompiled(self.model)
            else:
                self._compiled = torch.compile(self.model, **self._kw)
        with torch.inference_mode():
            return call(self._compiled, to_device(x, self.device, non_blocking=True))

    def describe(self) -> dict[str, Any]:
        how = (
            "inductor, freezing, static shapes"
            if self._frozen
            else (str(self._kw) if self._kw else "default")
        )
        return {**super().describe(), "compile": how}

    def same_runtime_baseline(self, state: Any) -> dict[str, Any] | None:
        """The original fp32 model compiled the same way, timed with the recipe's latency config."""
        import copy

        original = state.original_model()
        if original is state.original:  # in memory: compiling must not touch it
            original = copy.deepcopy(original)
        original = original.to(self.device).eval()
        return baseline_latency(state, CompiledRunner(original, self.device, frozen=self._frozen, **self._kw))


class OrtRunner(Runner):
    """ONNX Runtime (CPU execution provider) over an :class:`~compress_cli.runtime.ort.OrtModule`;
    the model's inputs in (fed by name), its output structure out."""

    runtime = "onnxruntime"

    def __init__(self, model: nn.Module, threads: int | None = None):
        import torch

        super().__init__(model, torch.device("cpu"))
        self.threads = threads

    def prepare(self) -> None:
        self.model.session  # noqa: B018 - create the session outside the timed region

    def __call__(self, x: Any) -> Any:
        from compress_cli._utils.batches import call

        return call(self.model, x)

    def describe(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {
            "runtime": self.runtime,
            "device": "cpu",
            "provider": "CPUExecutionProvider",
            "onnxruntime": ort.__version__,
        }

    def same_runtime_baseline(self, state: Any) -> dict[str, Any] | None:
        """The original fp32 model exported to ONNX (with the data's input spec: names, dtypes,
        dynamic batch and sequence axes) and run in ONNX Runtime, same threads."""
        from compress_cli.runtime.export import fp32_onnx
        from compress_cli.runtime.inputs import InputSpec
        from compress_cli.runtime.ort import OrtModule

        original = state.original_model()
        fp32, _ = fp32_onnx(original, InputSpec.from_example(state.data.example_input(2), original))
        return baseline_latency(state, OrtRunner(OrtModule(fp32, self.threads), self.threads))


def baseline_latency(state: Any, runner: Runner) -> dict[str, Any] | None:
    """Latency/throughput of ``runner`` with the recipe's latency config (None when latency is off)."""
    from compress_cli.runtime.measure import latency

    cfg = state.recipe.measure.latency
    if cfg is None:
        return None
    out = latency(runner, state.data.example_input, cfg)
    return {**out, **runner.describe(), "model": "original fp32"}


class OpenVinoRunner(Runner):
    """OpenVINO (CPU plugin, ``PERFORMANCE_HINT: LATENCY``) over an
    :class:`~compress_cli.runtime.openvino.OvModule`; the model's inputs in, its output structure out."""

    runtime = "openvino"

    def __init__(self, model: nn.Module, threads: int | None = None):
        import torch

        super().__init__(model, torch.device("cpu"))
        self.threads = threads

    def prepare(self) -> None:
        self.model.compile()  # type: ignore[operator]  # compile outside the timed region

    def __call__(self, x: Any) -> Any:
        from compress_cli._utils.batches import call

        return call(self.model, x)

    def describe(self) -> dict[str, Any]:
        import openvino as ov

        return {"runtime": self.runtime, "device": "cpu", "openvino": ov.get_version().split("-")[0]}

    def same_runtime_baseline(self, state: Any) -> dict[str, Any] | None:
        """The original fp32 model converted to OpenVINO on the data's example input, same threads,
        f32 inference (a bf16 ``inference_precision`` is part of what is measured against it)."""
        from compress_cli.runtime.openvino import OvModule, ov_convert

        original = state.original_model()
        om, _, _ = ov_convert(original, state.data.example_input(2))
        return baseline_latency(state, OpenVinoRunner(OvModule(om, self.threads), self.threads))
