"""Export a model for deployment: ONNX (checked in ONNX Runtime), torch.export (.pt2), TorchScript.

Plain functions; the ``export`` stage, ONNX Runtime quantization and the same-runtime baseline call
them. The one ONNX export path: :func:`onnx_bytes` (with :func:`write_onnx` for a deployable file and
:func:`fp32_onnx` for what ONNX Runtime runs), one exporter vocabulary (:data:`EXPORTER_SETTINGS`).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import statistics
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress_cli.errors import StageError

if TYPE_CHECKING:
    from torch import nn

    from compress_cli.runtime.inputs import InputSpec

#: the name of a model's single tensor output in every ONNX file this package writes; the input's
#: is :data:`~compress_cli.runtime.inputs.ONNX_INPUT` (named inputs keep their names)
ONNX_OUTPUT = "logits"
#: ONNX metadata keys: the input spec and the output structure (what OrtModule rebuilds)
META_INPUTS, META_OUTPUTS = "compress.inputs", "compress.outputs"
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
    example: Any,
    *,
    opset: int = 18,
    dynamic_batch: bool = True,
    exporters: Sequence[str] = ("dynamo", "legacy"),
) -> tuple[bytes, str]:
    """The model as ONNX -> (file bytes, exporter used).

    ``example``: the model's inputs (a tensor, tuple or dict; see :mod:`compress_cli.runtime.inputs`
    for the names they get: ``input`` for one tensor, the keys of a dict in ``forward``'s order).
    Outputs: every tensor the model returns, named by its place in the output (``logits`` for a
    single tensor, the keys of a dict or ``ModelOutput``, ``output_0``... of a tuple; see
    :func:`output_layout`), the structure recorded in the file's metadata so that
    :class:`~compress_cli.runtime.ort.OrtModule` returns what the model returns. With
    ``dynamic_batch`` the batch axis, and the sequence axis of token inputs, are dynamic.
    ``exporters`` (see :data:`EXPORTER_SETTINGS`) are tried in order; the legacy one refuses e.g.
    adaptive pooling to a size that does not divide the input. The one place we call torch.onnx.
    """
    from compress_cli.runtime.inputs import InputSpec

    model = model.eval()
    spec = InputSpec.from_example(example, model)
    layout = output_layout(model, spec, example)
    errors: list[str] = []
    for exporter in exporters:
        try:
            data = _onnx_once(model, spec, example, layout, exporter, opset, dynamic_batch)
            return with_metadata(data, spec, layout), exporter
        except Exception as e:
            errors.append(
                f"{exporter}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            )
    raise StageError("ONNX export failed (" + "; ".join(errors) + ")")


@dataclass(frozen=True)
class OutputLayout:
    """The tensors a model returns, flattened as the exporters flatten them: their ONNX ``names``,
    their dynamic ``axes`` (by name), and ``structure`` (JSON: a leaf is an output name, ``{"dict":
    [[key, sub], ...]}`` or ``{"list": [sub, ...]}``) to rebuild the model's output from them."""

    names: list[str]
    axes: dict[str, dict[int, str]]
    structure: Any


def _flatten_output(out: Any, path: str, top: bool, leaves: list[tuple[str, Any]]) -> Any:
    from collections.abc import Mapping

    import torch

    if isinstance(out, torch.Tensor):
        name = ONNX_OUTPUT if top else path
        leaves.append((name, out))
        return name
    if isinstance(out, Mapping):
        items = [(str(k), v) for k, v in out.items() if v is not None]
        subs = [[k, _flatten_output(v, f"{path}.{k}" if path else k, False, leaves)] for k, v in items]
        return {"dict": [s for s in subs if s[1] is not None]}
    if isinstance(out, (tuple, list)):
        subs = [
            _flatten_output(v, f"{path}.{i}" if path else f"output_{i}", False, leaves)
            for i, v in enumerate(out)
        ]
        return {"list": subs}
    return None  # not a tensor: not an ONNX output


def output_layout(model: nn.Module, spec: Any, example: Any) -> OutputLayout:
    """How ``model``'s output on ``example`` becomes ONNX outputs. The dynamic axes are found by
    calling it again with one more sample and (for token inputs) another sequence length: the
    axes whose size follows are the batch / sequence axes."""
    import torch

    from compress_cli._utils.batches import call

    with torch.no_grad():
        leaves: list[tuple[str, Any]] = []
        structure = _flatten_output(call(model, example), "", True, leaves)
        if not leaves:
            raise StageError("the model returns no tensor: nothing to export")
        n = next(iter(leaves))[1].shape[0] if leaves[0][1].dim() else 1
        seq = spec.sequence_length
        other_seq = None if seq is None else (seq - 1 if seq > 1 else seq + 1)
        try:
            again: list[tuple[str, Any]] = []
            _flatten_output(call(model, spec.example(n + 1, other_seq)), "", True, again)
        except Exception:
            again = []
    axes: dict[str, dict[int, str]] = {}
    for i, (name, t) in enumerate(leaves):
        moved = again[i][1].shape if len(again) == len(leaves) else None
        named: dict[int, str] = {}
        for a, size in enumerate(t.shape):
            if moved is None:
                if a == 0 and size == n:
                    named[a] = "batch"
            elif a < len(moved) and moved[a] != size:
                named[a] = "batch" if a == 0 and moved[a] == size + 1 else "sequence"
        axes[name] = named
    return OutputLayout([name for name, _ in leaves], axes, structure)


def with_metadata(data: bytes, spec: Any, layout: OutputLayout) -> bytes:
    """``data`` (an ONNX file) with the input spec and the output structure in its metadata. A
    serialized ``ModelProto`` holding only ``metadata_props`` is appended: protobuf merges repeated
    fields, so the model is not parsed (it may be gigabytes)."""
    import json

    import onnx

    extra = onnx.ModelProto()
    for key, value in ((META_INPUTS, spec.to_json()), (META_OUTPUTS, layout.structure)):
        prop = extra.metadata_props.add()
        prop.key, prop.value = key, json.dumps(value, separators=(",", ":"))
    return data + extra.SerializeToString()


#: whether the TorchScript exporter may merge parameters of equal value (see
#: :func:`merging_equal_initializers`)
_MERGE_EQUAL: contextvars.ContextVar[bool] = contextvars.ContextVar("merge_equal", default=False)


@contextlib.contextmanager
def merging_equal_initializers() -> Iterator[None]:
    """Exports inside this block merge parameters of equal value into one initializer, as the
    TorchScript exporter did here before: the graph an onnxruntime_int8 checkpoint written then
    recorded its scales on."""
    token = _MERGE_EQUAL.set(True)
    try:
        yield
    finally:
        _MERGE_EQUAL.reset(token)


@contextlib.contextmanager
def _torchscript_exporter_fixes() -> Iterator[None]:
    """Three quirks of torch's TorchScript ONNX exporter, undone for the export:

    - ``nn.MultiheadAttention`` takes its fused fast path in eval mode without grad, and the fused op
      (``aten::_native_multi_head_attention``) has no symbolic: every ViT fell back to the dynamo
      exporter (3.3x slower on vit_b_32: 14.1 s vs 4.3 s). The standard path exports.
    - The exporter switches its C++ log on for good (``setup_onnx_logging`` tests the function
      ``_jit_is_onnx_log_enabled`` for truth, not its result), then prints the whole IR graph to the
      process's stdout when an op fails: thousands of lines for a ViT, past Python's redirection.
    - In eval mode it merges parameters of equal value into one initializer, so the graph's names
      depend on the weights' values: two tiny biases (timm's transformer MLPs start at std 1e-6)
      that int8 snapping rounds to zero became one initializer when load() exported the snapped
      model, and the ONNX Runtime graph rebuilt from it no longer had the recorded bias scales
      (coatnet_nano_rw_224's onnxruntime_int8). Only parameters that are the same tensor (tied
      weights) are merged now, as the exporter does in training mode (inside
      :func:`merging_equal_initializers`: as before).
    """
    import torch

    mha, c = torch.backends.mha, torch._C
    fast, log, set_log = mha.get_fastpath_enabled(), c._jit_is_onnx_log_enabled(), c._jit_set_onnx_log_enabled
    dedup = c._jit_pass_onnx_deduplicate_initializers
    mha.set_fastpath_enabled(False)
    set_log(False)
    c._jit_set_onnx_log_enabled = lambda enabled: None
    if not _MERGE_EQUAL.get():  # is_train True: the merge by data pointer only, not by value
        c._jit_pass_onnx_deduplicate_initializers = lambda graph, params_dict, is_train: dedup(
            graph, params_dict, True
        )
    try:
        yield
    finally:
        c._jit_pass_onnx_deduplicate_initializers = dedup
        c._jit_set_onnx_log_enabled = set_log
        set_log(log)
        mha.set_fastpath_enabled(fast)


def _rename_sequence_dims(proto: Any, spec: Any) -> None:
    """The dynamo exporter names an inferred dimension ``s53``: call the token inputs' sequence
    axis ``sequence`` wherever that dimension appears (inputs, outputs, value infos)."""
    graph = proto.graph
    by_name = {i.name: i for i in graph.input}
    renames = {}
    for t in spec.tensors:
        if t.is_token and t.name in by_name:
            dim = by_name[t.name].type.tensor_type.shape.dim[1]
            if dim.dim_param:
                renames[dim.dim_param] = "sequence"
    if not renames:
        return
    for v in [*graph.input, *graph.output, *graph.value_info]:
        for dim in v.type.tensor_type.shape.dim:
            if dim.dim_param in renames:
                dim.dim_param = renames[dim.dim_param]


def _onnx_once(
    model: nn.Module, spec: Any, example: Any, layout: OutputLayout, exporter: str, opset: int, dynamic: bool
) -> bytes:
    import io

    import torch

    from compress_cli._utils.quiet import quiet

    args, kwargs = spec.args_kwargs(example)
    if exporter == "dynamo":
        shapes = spec.dynamic_shapes() if dynamic else None
        with torch.no_grad(), quiet():
            prog = torch.onnx.export(
                model,
                args,
                kwargs=kwargs,
                dynamo=True,
                dynamic_shapes=shapes,
                opset_version=max(opset, 18),
                input_names=spec.names,
                output_names=layout.names,
                verbose=False,
                optimize=True,
            )
        assert prog is not None
        proto = prog.model_proto
        if len(proto.graph.output) != len(layout.names):
            raise StageError(
                f"{len(proto.graph.output)} outputs exported, the model returns {len(layout.names)}"
            )
        if dynamic:
            _rename_sequence_dims(proto, spec)
        return proto.SerializeToString()
    axes = {**spec.dynamic_axes(), **layout.axes} if dynamic else None
    buf = io.BytesIO()
    with torch.no_grad(), quiet(), _torchscript_exporter_fixes():
        torch.onnx.export(
            model,
            args,
            buf,  # type: ignore[arg-type]  # a file object is accepted
            kwargs=kwargs,
            dynamo=False,
            opset_version=min(opset, 20),
            input_names=spec.names,
            output_names=layout.names,
            dynamic_axes=axes,
            do_constant_folding=True,
        )
    return buf.getvalue()


def write_onnx(
    model: nn.Module,
    example: Any,
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
    inputs: InputSpec | Iterable[int],
    *,
    opset: int = 17,
    exporters: Sequence[str] = ("legacy", "dynamo"),
) -> tuple[bytes, str]:
    """fp32 ONNX of ``model`` (in eval mode) with dynamic batch (and sequence) axes -> (bytes,
    exporter used). ``inputs``: the model's input spec (or one float tensor's sample shape); the
    export runs on its :meth:`~compress_cli.runtime.inputs.InputSpec.example` of 2 samples.

    What ONNX Runtime quantizes and the fp32 same-runtime baseline runs. ``model`` is left as it was
    (each module's train/eval mode comes back). It is copied only when it is not all-CPU fp32 already:
    the copy is the model's size again, which a 500M-parameter model (ViT-H/14) cannot spare next to
    the exporter."""
    import torch

    from compress_cli.runtime.inputs import InputSpec

    spec = InputSpec.coerce(inputs)  # type: ignore[arg-type]
    tensors = [*model.parameters(), *model.buffers()]
    ready = all(
        t.device.type == "cpu" and t.dtype in (torch.float32, torch.int64, torch.bool) for t in tensors
    )
    modes = {name: m.training for name, m in model.named_modules()}
    work = model if ready else copy.deepcopy(model).cpu().float()
    try:
        return onnx_bytes(work.eval(), spec.example(2), opset=opset, exporters=exporters)
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


def export_torch(model: nn.Module, example: Any, path: Path, dynamic_batch: bool = True) -> Any:
    """torch.export to a .pt2 file; returns the ExportedProgram. ``example``: the model's inputs (a
    tensor, tuple or dict: keyword arguments); batch and token-sequence axes dynamic."""
    import torch

    from compress_cli.runtime.inputs import InputSpec

    path.parent.mkdir(parents=True, exist_ok=True)
    spec = InputSpec.from_example(example, model)
    args, kwargs = spec.args_kwargs(example)
    shapes = spec.dynamic_shapes() if dynamic_batch else None
    if not isinstance(model, torch.fx.GraphModule):  # exported graphs refuse eval()
        model = model.eval()
    try:
        ep = torch.export.export(model, args, kwargs=kwargs, dynamic_shapes=shapes)
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


def export_torchscript(model: nn.Module, example: Any, path: Path) -> Any:
    """``torch.jit.trace`` on ``example`` (a dict: keyword inputs) saved to ``path``; returns the
    traced module."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad():
            if isinstance(example, dict):
                ts = torch.jit.trace(model.eval(), example_kwarg_inputs=example)
            else:
                ts = torch.jit.trace(model.eval(), tuple(example) if isinstance(example, list) else example)
        torch.jit.save(ts, str(path))
    except Exception as e:
        raise StageError(
            f"TorchScript export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    return ts


def run_on(fn: Any, x: Any) -> Any:
    """``fn`` on the inputs ``x``: a runner takes the structure as it is; a module or an exported
    program is called with it (dict: keywords, tuple: positional)."""
    from compress_cli._utils.batches import call

    return fn(x) if hasattr(fn, "prepare") else call(fn, x)


def max_abs_diff(fn: Any, reference: Any, x: Any) -> tuple[float, float]:
    """(max |fn(x) - reference(x)|, max |reference(x)|) over every floating-point tensor the two
    return (in order; a dict output is compared key by key); ``reference`` is a module or a runner."""
    import torch

    from compress_cli._utils.batches import float_tensors

    with torch.no_grad():
        if hasattr(reference, "prepare"):  # a runners.Runner
            reference.prepare()
        elif isinstance(reference, torch.nn.Module):
            reference.eval()
        refs = [t.float().cpu() for t in float_tensors(run_on(reference, x))]
        gots = [t.float().cpu() for t in float_tensors(run_on(fn, x))]
    if [t.shape for t in gots] != [t.shape for t in refs]:
        shapes = [tuple(t.shape) for t in gots], [tuple(t.shape) for t in refs]
        raise StageError(f"exported model returns shapes {shapes[0]}, PyTorch {shapes[1]}")
    if not refs:
        raise StageError("the model returns no floating-point tensor to compare")
    diff = max(float((g - r).abs().max()) if r.numel() else 0.0 for g, r in zip(gots, refs, strict=True))
    return diff, max(float(r.abs().max()) if r.numel() else 0.0 for r in refs)


def median_latency_ms(fn: Any, x: Any, warmup: int = 3, iterations: int = 10) -> float:
    """Median wall time of ``fn(x)`` (see :func:`run_on`) in milliseconds, after ``warmup`` calls;
    synchronised around each call when ``x`` is on a CUDA device (else only the launches count)."""
    import torch

    from compress_cli._utils.batches import tensors
    from compress_cli.runtime.measure import time_calls

    device = next(tensors(x), torch.empty(0)).device
    with torch.inference_mode():
        return statistics.median(time_calls(lambda v: run_on(fn, v), x, device, warmup, iterations)) * 1e3
