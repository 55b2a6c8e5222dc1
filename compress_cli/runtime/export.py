"""Export a model for deployment: ONNX (checked in ONNX Runtime), torch.export (.pt2), TorchScript.

Plain functions; the ``export`` stage, ONNX Runtime quantization and the same-runtime baseline call
them. The one ONNX export path: :func:`onnx_bytes` (with :func:`write_onnx` for a deployable file and
:func:`fp32_onnx` for what ONNX Runtime runs), one exporter vocabulary (:data:`EXPORTER_SETTINGS`).
"""

from __future__ import annotations

import contextlib
import copy
import statistics
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress_cli.errors import StageError

if TYPE_CHECKING:
    import torch
    from torch import nn

#: names of the model's input and output in every ONNX file this package writes
ONNX_INPUT, ONNX_OUTPUT = "input", "logits"
#: the torch.onnx exporters: ``dynamo`` (torch.export-based, where torch is heading, takes more ops) and
#: ``legacy`` (TorchScript-based: ~20x faster here, initializers named by their state-dict keys, but it
#: refuses some ops). An ``exporter`` setting -> the exporters it tries, in order; ``torchscript`` is
#: ``legacy`` as the quantize stage's recipes and manifests spell it; ``auto`` is the caller's order.
EXPORTER_SETTINGS: dict[str, tuple[str, ...]] = {
    "dynamo": ("dynamo",),
    "legacy": ("legacy",),
    "torchscript": ("legacy",),
}


def exporter_order(setting: str, auto: Sequence[str]) -> tuple[str, ...]:
    """The exporters an ``exporter`` setting tries, in order (``auto``: the given order)."""
    return tuple(auto) if setting == "auto" else EXPORTER_SETTINGS[setting]


def onnx_bytes(
    model: nn.Module,
    example: torch.Tensor,
    *,
    opset: int = 18,
    dynamic_batch: bool = True,
    exporters: Sequence[str] = ("dynamo", "legacy"),
) -> tuple[bytes, str]:
    """The model as ONNX (input ``input``, output ``logits``) -> (file bytes, exporter used).

    ``exporters`` (see :data:`EXPORTER_SETTINGS`) are tried in order; the legacy one refuses e.g.
    adaptive pooling to a size that does not divide the input. The one place we call torch.onnx.
    """
    model = model.eval()
    errors: list[str] = []
    for exporter in exporters:
        try:
            return _onnx_once(model, example, exporter, opset, dynamic_batch), exporter
        except Exception as e:
            errors.append(
                f"{exporter}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            )
    raise StageError("ONNX export failed (" + "; ".join(errors) + ")")


@contextlib.contextmanager
def _torchscript_exporter_fixes() -> Iterator[None]:
    """Two quirks of torch's TorchScript ONNX exporter, undone for the export:

    - ``nn.MultiheadAttention`` takes its fused fast path in eval mode without grad, and the fused op
      (``aten::_native_multi_head_attention``) has no symbolic: every ViT fell back to the dynamo
      exporter (3.3x slower on vit_b_32: 14.1 s vs 4.3 s). The standard path exports.
    - The exporter switches its C++ log on for good (``setup_onnx_logging`` tests the function
      ``_jit_is_onnx_log_enabled`` for truth, not its result), then prints the whole IR graph to the
      process's stdout when an op fails: thousands of lines for a ViT, past Python's redirection.
    """
    import torch

    mha, c = torch.backends.mha, torch._C
    fast, log, set_log = mha.get_fastpath_enabled(), c._jit_is_onnx_log_enabled(), c._jit_set_onnx_log_enabled
    mha.set_fastpath_enabled(False)
    set_log(False)
    c._jit_set_onnx_log_enabled = lambda enabled: None
    try:
        yield
    finally:
        c._jit_set_onnx_log_enabled = set_log
        set_log(log)
        mha.set_fastpath_enabled(fast)


def _onnx_once(
    model: nn.Module, example: torch.Tensor, exporter: str, opset: int, dynamic_batch: bool
) -> bytes:
    import io

    import torch

    from compress_cli._utils.quiet import quiet

    if exporter == "dynamo":
        shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
        with torch.no_grad(), quiet():
            prog = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                dynamic_shapes=shapes,
                opset_version=max(opset, 18),
                input_names=[ONNX_INPUT],
                output_names=[ONNX_OUTPUT],
                verbose=False,
                optimize=True,
            )
        assert prog is not None
        return prog.model_proto.SerializeToString()
    axes = {ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}} if dynamic_batch else None
    buf = io.BytesIO()
    with torch.no_grad(), quiet(), _torchscript_exporter_fixes():
        torch.onnx.export(
            model,
            (example,),
            buf,  # type: ignore[arg-type]  # a file object is accepted
            dynamo=False,
            opset_version=min(opset, 20),
            input_names=[ONNX_INPUT],
            output_names=[ONNX_OUTPUT],
            dynamic_axes=axes,
            do_constant_folding=True,
        )
    return buf.getvalue()


def write_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    opset: int = 18,
    dynamic_batch: bool = True,
    exporter: str = "auto",
) -> str:
    """Write ``path`` (see :func:`onnx_bytes`; ``auto``: dynamo, then legacy); returns the exporter used."""
    from compress_cli._utils.io import atomic_write_bytes

    order = exporter_order(exporter, ("dynamo", "legacy"))
    data, used = onnx_bytes(model, example, opset=opset, dynamic_batch=dynamic_batch, exporters=order)
    atomic_write_bytes(path, data)
    return used


def fp32_onnx(
    model: nn.Module,
    input_shape: Iterable[int],
    *,
    opset: int = 17,
    exporters: Sequence[str] = ("legacy", "dynamo"),
) -> tuple[bytes, str]:
    """fp32 ONNX of ``model`` (in eval mode) with a dynamic batch axis -> (bytes, exporter used).

    What ONNX Runtime quantizes and the fp32 same-runtime baseline runs. ``model`` is left as it was
    (each module's train/eval mode comes back). It is copied only when it is not all-CPU fp32 already:
    the copy is the model's size again, which a 500M-parameter model (ViT-H/14) cannot spare next to
    the exporter."""
    import torch

    tensors = [*model.parameters(), *model.buffers()]
    ready = all(
        t.device.type == "cpu" and t.dtype in (torch.float32, torch.int64, torch.bool) for t in tensors
    )
    modes = {name: m.training for name, m in model.named_modules()}
    work = model if ready else copy.deepcopy(model).cpu().float()
    try:
        return onnx_bytes(work.eval(), torch.zeros(2, *input_shape), opset=opset, exporters=exporters)
    finally:
        for name, m in model.named_modules():
            m.training = modes[name]


def ort_session(path: Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session over the file at ``path`` (``threads``: intra-op threads)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def ort_callable(session: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """``session`` as a function of one tensor (its first input), returning its first output."""
    import torch

    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy()})[0])

    return run


def export_torch(model: nn.Module, example: torch.Tensor, path: Path, dynamic_batch: bool = True) -> Any:
    """torch.export to a .pt2 file; returns the ExportedProgram."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    if not isinstance(model, torch.fx.GraphModule):  # exported graphs refuse eval()
        model = model.eval()
    try:
        ep = torch.export.export(model, (example,), dynamic_shapes=shapes)
    except Exception as e:
        raise StageError(
            f"torch.export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    ep = strip_unused_constants(ep)
    torch.export.save(ep, str(path))
    return ep


def drop_unused_state(gm: Any) -> Any:
    """Delete the parameters and buffers of a GraphModule that no node reads. PT2E's convert folds
    each weight into an int8 constant but leaves the fp32 parameter beside it: exported as is, the
    .pt2 of an int8 model was 1.4x the fp32 state_dict."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    for name, _ in [*gm.named_parameters(), *gm.named_buffers()]:
        if name in used or any(name.startswith(f"{c}.") for c in called):
            continue
        owner, _, attr = name.rpartition(".")
        delattr(gm.get_submodule(owner) if owner else gm, attr)
    return gm


def strip_unused_constants(ep: Any) -> Any:
    """Drop state no graph node reads (e.g. fp32 weights left behind by a PT2E int8 conversion)."""
    used = {n.target for n in ep.graph.nodes if n.op == "get_attr"} | {
        s.target for s in ep.graph_signature.input_specs if s.target is not None
    }
    for name in [k for k in ep.state_dict if k not in used]:
        del ep.state_dict[name]
    for name in [k for k in ep.constants if k not in used]:
        del ep.constants[name]
    return ep


def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> Any:
    """``torch.jit.trace`` on ``example`` saved to ``path``; returns the traced module."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad():
            ts = torch.jit.trace(model.eval(), example)
        torch.jit.save(ts, str(path))
    except Exception as e:
        raise StageError(
            f"TorchScript export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    return ts


def max_abs_diff(fn: Any, reference: Any, x: torch.Tensor) -> tuple[float, float]:
    """(max |fn(x) - reference(x)|, max |reference(x)|); ``reference`` is a module or a runner."""
    import torch

    with torch.no_grad():
        if hasattr(reference, "prepare"):  # a runners.Runner
            reference.prepare()
        elif isinstance(reference, torch.nn.Module):
            reference.eval()
        ref = reference(x).float().cpu()
        got = fn(x).float().cpu()
    if got.shape != ref.shape:
        raise StageError(f"exported model returns shape {tuple(got.shape)}, PyTorch {tuple(ref.shape)}")
    return float((got - ref).abs().max()), float(ref.abs().max())


def median_latency_ms(fn: Any, x: torch.Tensor, warmup: int = 3, iterations: int = 10) -> float:
    """Median wall time of ``fn(x)`` on CPU in milliseconds, after ``warmup`` calls."""
    import torch

    from compress_cli.runtime.measure import time_calls

    with torch.inference_mode():
        return statistics.median(time_calls(fn, x, torch.device("cpu"), warmup, iterations)) * 1e3
