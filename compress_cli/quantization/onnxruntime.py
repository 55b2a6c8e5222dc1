"""onnxruntime_int8: ONNX Runtime static int8 (QDQ, per-channel int8 weights, uint8 activations).

The model is exported to ONNX (:func:`compress_cli.runtime.export.fp32_onnx`), quantized by ONNX
Runtime's ``quantize_static``, and every quantized weight is written back into the PyTorch module
as its dequantized value; the entry keeps every scale / zero point. load() exports the stored
module again and rebuilds the same QDQ graph with the recorded scales (:func:`ort_requantize`), run
by :class:`~compress_cli.runtime.ort.OrtModule`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from compress_cli._utils.arrays import pack_array, unpack_array
from compress_cli._utils.quiet import quiet
from compress_cli.errors import SourceError, StageError
from compress_cli.quantization.base import Int8Handler, Int8Job, SchemeHandler
from compress_cli.quantization.schemes import register_scheme
from compress_cli.runtime.export import exporter_order, fp32_onnx
from compress_cli.runtime.inputs import ONNX_INPUT, InputSpec
from compress_cli.runtime.ort import OrtModule
from compress_cli.runtime.runners import OrtRunner, Runner

if TYPE_CHECKING:
    from compress_cli.state import State

#: ``exporter: auto`` here: the TorchScript-based exporter first (much faster, and its initializers
#: keep their state-dict names), dynamo where it refuses an op
_AUTO_EXPORTERS = ("legacy", "dynamo")


def write_fp32_onnx(
    model: nn.Module, inputs: InputSpec | Iterable[int], path: Path, opset: int, exporter: str
) -> str:
    """The fp32 ONNX of ``model`` written to ``path`` (ONNX Runtime's quantizer reads a file; the
    bytes are not held while it runs: they are the model's size again). ``inputs``: the model's
    input spec (or one float tensor's sample shape). Returns the exporter used, as the recipe and
    the manifest spell it."""
    data, used = fp32_onnx(model, inputs, opset=opset, exporters=exporter_order(exporter, _AUTO_EXPORTERS))
    Path(path).write_bytes(data)
    return "torchscript" if used == "legacy" else used


def load_onnx(src: bytes | Path) -> Any:
    """An ONNX ModelProto from file bytes or a path."""
    import onnx

    return onnx.load_from_string(src) if isinstance(src, bytes) else onnx.load(str(src))


#: the op types ``onnxruntime_int8`` quantizes by default in a model with attention or embeddings
#: (plus Conv where it has convolutions): the mask arithmetic (Add/Mul/Where of ``finfo.min``), the
#: embedding gathers and the normalizations stay in float
TRANSFORMER_OP_TYPES = ("MatMul", "Gemm")


def is_transformer_like(model: nn.Module) -> bool:
    """Whether ``model`` has attention or embedding modules: ``nn.MultiheadAttention``,
    ``nn.Embedding``, a module with an int ``num_heads`` / ``num_attention_heads``, or any module
    from the ``transformers`` package."""
    for m in model.modules():
        if isinstance(m, (nn.MultiheadAttention, nn.Embedding, nn.EmbeddingBag)):
            return True
        if type(m).__module__.startswith("transformers."):
            return True
        for attr in ("num_heads", "num_attention_heads"):
            if isinstance(getattr(m, attr, None), int):
                return True
    return False


def default_op_types(model: nn.Module) -> list[str] | None:
    """The ``op_types_to_quantize`` default for ``model``: MatMul/Gemm (+Conv where it has
    convolutions) for a model with attention or embeddings; None (every op type ONNX Runtime can
    quantize) otherwise."""
    if not is_transformer_like(model):
        return None
    convs = any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in model.modules())
    return [*TRANSFORMER_OP_TYPES, *(["Conv"] if convs else [])]


#: relative L2 difference the fp32 ONNX export's outputs may have from the model's
ONNX_RTOL = 1e-3


def check_onnx_follows(
    model: nn.Module, fp32: bytes | Path, batches: list[Any], spec: InputSpec | None = None
) -> None:
    """Refuse (StageError) an fp32 export whose outputs differ from ``model``'s on ``batches``
    (model inputs of ``spec``'s structure; default: each its own): the exporter traced one path of
    a forward that branches on its input's values, and the graph would replay it for every input.
    The refusal names the source line that reads an input-dependent tensor into Python."""
    import onnxruntime as ort

    from compress_cli._utils.batches import call, float_tensors
    from compress_cli.quantization.branches import value_branches

    src = fp32 if isinstance(fp32, bytes) else str(fp32)
    session = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    for x in batches:
        feeds = (spec or InputSpec.from_example(x, model)).arrays(x)
        got = session.run(None, feeds)[0]
        with torch.no_grad():
            want = next(iter(float_tensors(call(model, x))), None)
        if want is None or tuple(want.shape) != got.shape:
            continue
        ref = want.double()
        diff = float((ref - torch.from_numpy(got).double()).norm() / ref.norm().clamp_min(1e-12))
        if diff <= ONNX_RTOL:
            continue
        found = value_branches(model, x)
        where = (
            f": its forward reads a tensor computed from its input into Python at {found[0]}, and the "
            "exported graph keeps the value the export's example gave"
            if found
            else ""
        )
        raise StageError(
            f"the ONNX export does not follow the model (relative difference {diff:.2g} on an example "
            f"batch){where}; rewrite that code with tensor ops (torch.where) or use scheme int8_dynamic "
            "(eager: Python control flow stays)"
        )


def quantizable_op_types(mode: str) -> set[str]:
    """The op types ONNX Runtime's quantizer handles: QDQ (static) or integer ops (dynamic)."""
    from onnxruntime.quantization import registry

    return set(registry.IntegerOpsRegistry if mode == "dynamic" else registry.QDQRegistry)


def _feeds(x: Any) -> dict[str, Any]:
    """ONNX Runtime feeds for one batch: a dict of named arrays as is, an array as the one input."""
    return dict(x) if isinstance(x, dict) else {ONNX_INPUT: x}


def _non_finite_range(e: Exception) -> bool:
    text = str(e)
    return isinstance(e, ValueError) and ("not finite" in text or "finite-sized bins" in text)


def ort_quantize(
    fp32: bytes | Path,
    batches: list[Any],
    reduce_range: bool,
    method: str = "minmax",
    exclude_nodes: Iterable[str] = (),
    op_types: Iterable[str] | None = None,
    mode: str = "static",
) -> bytes:
    """ONNX Runtime ``quantize_static``: QDQ format, per-channel int8 weights, uint8 activations
    (the x86 "U8S8" layout), calibrated on ``batches`` (numpy arrays, or dicts of them by input
    name). ``op_types``: the op types to quantize (None: every one ONNX Runtime can). ``mode``
    ``dynamic``: ``quantize_dynamic`` instead (int8 weights, activations quantized at run time by
    DynamicQuantizeLinear; no calibration, ``batches`` and ``method`` unused)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(batches)

        def get_next(self) -> dict[str, Any] | None:
            x = next(self.it, None)
            return None if x is None else _feeds(x)

    # nodes computing constants (Swin v2's cpb_mlp on its relative_coords_table buffer): quantizing
    # them buys nothing, and ORT quantizes a constant MatMul input as a weight, then shares it as an
    # activation through Identity nodes -> a DequantizeLinear bound to int8 and uint8 at load
    exclude = sorted(set(exclude_nodes) | set(constant_nodes(load_onnx(fp32).graph)))
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    ops = list(op_types) if op_types is not None else None
    with tempfile.TemporaryDirectory() as d, quiet():
        # from a file, not a ModelProto: ORT then loads the model once (given a proto, it saves and
        # reloads it, and ours stays alive too: two more copies of the weights at the peak)
        out = Path(d) / "q.onnx"
        if isinstance(fp32, bytes):
            (src := Path(d) / "fp32.onnx").write_bytes(fp32)
        else:
            src = fp32
        if mode == "dynamic":
            quantize_dynamic(
                str(src),
                str(out),
                op_types_to_quantize=ops,
                per_channel=True,
                reduce_range=reduce_range,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude or None,
            )
            return out.read_bytes()
        try:
            quantize_static(
                str(src),
                str(out),
                Reader(),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=ops,
                per_channel=True,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=methods[method],
                nodes_to_exclude=exclude or None,
                calibration_cache_path=None,
                extra_options={"CalibTensorRangeSymmetric": False},
            )
        except ValueError as e:
            if not _non_finite_range(e):
                raise
            # a tensor holding -inf or finfo.min (attention-mask arithmetic such as
            # (1 - mask) * finfo.min): its histogram has no finite range
            raise StageError(
                f"onnxruntime_int8: calibrate_method {method} cannot calibrate this model: a tensor it "
                "would quantize has an infinite range (typically attention-mask arithmetic such as "
                "(1 - mask) * finfo.min); set op_types_to_quantize: [MatMul, Gemm, Conv] (the default "
                "for models with attention or embeddings) so those tensors stay float, or use "
                "calibrate_method: minmax"
            ) from None
        return out.read_bytes()


def constant_nodes(graph: Any) -> list[str]:
    """Names of the nodes of an ONNX graph whose outputs do not depend on its inputs."""
    live = {i.name for i in graph.input}
    out = []
    for n in graph.node:  # ONNX graphs are topologically sorted
        if any(i in live for i in n.input):
            live.update(n.output)
        else:
            out.append(n.name)
    return out


def onnx_nodes_for_modules(fp32: bytes | Path, modules: Iterable[str]) -> list[str]:
    """Names of the ONNX nodes that read a parameter of one of ``modules`` (for nodes_to_exclude)."""
    prefixes = tuple(m + "." for m in modules)
    if not prefixes:
        return []
    g = load_onnx(fp32).graph
    inits = {i.name for i in g.initializer}
    return [n.name for n in g.node if any(i in inits and i.startswith(prefixes) for i in n.input)]


def _dq_axis(node: Any) -> int:
    for a in node.attribute:
        if a.name == "axis":
            return int(a.i)
    return 1


def _broadcast(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    if v.ndim == 0 or v.size == 1 or ndim == 0:
        return v.reshape(())
    axis = axis if 0 <= axis < ndim else 0
    shape = [1] * ndim
    shape[axis] = v.size
    return v.reshape(shape)


def initializer_sources(
    fp32: bytes | Path, names: Iterable[str], sd: dict[str, torch.Tensor]
) -> dict[str, tuple[str, bool]]:
    """For ONNX initializers not named after a state-dict key: the key whose tensor, or its
    transpose, they equal exactly -> (key, transposed). The TorchScript exporter folds constant
    transposes, e.g. ``nn.Linear`` on channels-last tensors (ConvNeXt) becomes MatMul with an
    initializer ``onnx::MatMul_N`` = W^T."""
    from onnx import numpy_helper

    wanted = set(names)
    inits = {i.name: numpy_helper.to_array(i) for i in load_onnx(fp32).graph.initializer if i.name in wanted}
    by_numel: dict[int, list[str]] = {}
    for k, t in sd.items():
        if t.is_floating_point():
            by_numel.setdefault(t.numel(), []).append(k)
    out: dict[str, tuple[str, bool]] = {}
    used: set[str] = set()
    for name, arr in inits.items():
        for k in by_numel.get(arr.size, []):
            if k in used:
                continue
            w = sd[k].detach().cpu().float().numpy()
            for transposed, cand in ((False, w), (True, w.T if w.ndim == 2 else None)):
                if cand is not None and cand.shape == arr.shape and np.array_equal(cand, arr):
                    out[name] = (k, transposed)
                    used.add(k)
                    break
            if name in out:
                break
    return out


def _quantized_inits(model: Any) -> list[tuple[str, str, str, str | None, int]]:
    """(quantized initializer, fp32 name it came from, its scale, its zero point or None, axis)
    of every weight an ONNX Runtime quantized model holds as integers: those a DequantizeLinear
    reads (QDQ, static; axis from the node) and those an integer op reads directly (QOperator,
    dynamic: MatMulInteger's weights are per output column, the last axis; others per row)."""
    from onnx import TensorProto

    ints = {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT32, TensorProto.INT16, TensorProto.UINT16}
    inits = {i.name: i for i in model.graph.initializer}
    out: dict[str, tuple[str, str, str, str | None, int]] = {}
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            init = inits.get(name)
            if init is None or init.data_type not in ints or not name.endswith("_quantized") or name in out:
                continue
            base = name[: -len("_quantized")]
            if node.op_type == "DequantizeLinear":
                if k != 0:
                    continue
                zp = node.input[2] if len(node.input) > 2 and node.input[2] in inits else None
                out[name] = (name, base, node.input[1], zp, _dq_axis(node))
            elif base + "_scale" in inits:
                zp_name = base + "_zero_point"
                axis = len(init.dims) - 1 if node.op_type == "MatMulInteger" else 0
                out[name] = (name, base, base + "_scale", zp_name if zp_name in inits else None, axis)
    return list(out.values())


def _qparam_names(model: Any) -> set[str]:
    """The scale / zero-point initializers of a quantized model: every Q/DQ node's, and every
    integer weight's (dynamic mode: no DequantizeLinear reads them)."""
    inits = {i.name for i in model.graph.initializer}
    names = set()
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            names |= {n for n in node.input[1:3] if n in inits}
    for _, _, scale, zp, _ in _quantized_inits(model):
        names |= {n for n in (scale, zp) if n is not None}
    return names


def ort_record(q: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """From a quantized model: every scale / zero-point initializer (packed), and the dequantized
    value of every quantized weight/bias keyed by the fp32 initializer name it replaced."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(q)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    params = {name: pack_array(inits[name]) for name in sorted(_qparam_names(model))}
    snapped = {}
    for qname, base, scale_name, zp_name, axis in _quantized_inits(model):
        qv = inits[qname]
        scale = inits[scale_name].astype(np.float32)
        zp = inits[zp_name] if zp_name is not None else np.zeros((), np.int64)
        ax = axis if axis >= 0 else axis + qv.ndim
        codes = (qv.astype(np.float64) - _broadcast(zp.astype(np.float64), qv.ndim, ax)).astype(np.float32)
        snapped[base] = (codes * _broadcast(scale, qv.ndim, ax)).astype(np.float32) + np.float32(0)
    return params, snapped


_TRANSPOSED = "_Transposed"


def snap_onnx_weights_(model: nn.Module, fp32: bytes | Path, snapped: dict[str, np.ndarray]) -> int:
    """Write the dequantized weights of :func:`ort_record` into ``model`` (the module ``fp32`` was
    exported from): by state-dict key, or through the parameter an initializer equals (transposed
    or not). Returns how many quantized constants have no parameter (derived by the exporter)."""
    sd = model.state_dict()
    where = {k: (k, False) for k in snapped if k in sd}
    where.update(initializer_sources(fp32, [k for k in snapped if k not in sd], sd))
    for k in snapped:  # dynamic mode's Gemm -> MatMul over W^T, named after W
        base = k[: -len(_TRANSPOSED)]
        if k not in where and k.endswith(_TRANSPOSED) and base in sd and sd[base].dim() == 2:
            where[k] = (base, True)
    with torch.no_grad():
        for k, v in snapped.items():
            if k not in where:
                continue
            key, transposed = where[k]
            t = torch.from_numpy(v)
            sd[key].copy_(t.T if transposed else t.reshape(sd[key].shape))
    return sum(k not in where for k in snapped)


def _zero_bias(qparam: str, fp32_inits: dict[str, Any]) -> bool:
    """Whether ``qparam`` (a recorded scale / zero-point name) is a quantized bias's whose fp32
    bias is absent from the export or all zeros."""
    from onnx import numpy_helper

    for suffix in ("_quantized_scale", "_quantized_zero_point"):
        if qparam.endswith(suffix):
            base = qparam[: -len(suffix)]
            if not base.endswith("bias"):
                return False
            init = fp32_inits.get(base)
            return init is None or not np.any(numpy_helper.to_array(init))
    return False


def ort_requantize(
    fp32: bytes | Path,
    params: dict[str, Any],
    reduce_range: bool,
    inputs: InputSpec | Iterable[int] | None,
    exclude_nodes: Iterable[str] = (),
    op_types: Iterable[str] | None = None,
    mode: str = "static",
    dummy: list[Any] | None = None,
) -> bytes:
    """The quantized model for ``fp32`` (weights already on the grid) with the recorded scales:
    the same ONNX Runtime quantization on one dummy batch (``dummy``, else 2 samples of the input
    spec ``inputs`` (or one float tensor's sample shape): floats drawn from a seeded normal, ids
    zeros, masks ones) gives the graph; every scale / zero point is then replaced by the recorded
    one and every quantized initializer recomputed from the fp32 weights."""
    import onnx
    from onnx import numpy_helper

    if dummy is None:
        assert inputs is not None
        spec = InputSpec.coerce(inputs)  # type: ignore[arg-type]
        dummy = [spec.arrays(spec.example(2, rng=np.random.default_rng(0)))]
    q = ort_quantize(fp32, dummy, reduce_range, "minmax", exclude_nodes, op_types, mode)
    model = onnx.load_from_string(q)
    # initializers as protos, each converted when used: all of them as arrays is the model's size again
    src = {i.name: i for i in load_onnx(fp32).graph.initializer}
    index = {i.name: k for k, i in enumerate(model.graph.initializer)}

    def put(name: str, value: np.ndarray) -> None:
        model.graph.initializer[index[name]].CopyFrom(numpy_helper.from_array(value, name))

    qparam_names = _qparam_names(model)
    # a bias whose int32 codes were all zero was snapped to zeros; the exporter shares equal zero
    # biases as one constant, which ONNX Runtime then leaves float (no qparams): nothing to put
    # back, a zero bias either way (mobilenet_v3_large with re-estimated batch norms: two of them)
    gone = {n for n in set(params) - qparam_names if _zero_bias(n, src)}
    params = {k: v for k, v in params.items() if k not in gone}
    if qparam_names != set(params):
        raise SourceError(
            "the ONNX Runtime quantized graph differs from the recorded one (onnxruntime version change?): "
            f"recorded but absent {sorted(set(params) - qparam_names)[:3]}, "
            f"new {sorted(qparam_names - set(params))[:3]}"
        )
    for name, packed in params.items():
        put(name, unpack_array(packed))
    cur = {i.name: i for i in model.graph.initializer}  # put() updates these protos in place
    for qname, base, scale_name, zp_name, ax in _quantized_inits(model):
        transposed = base.endswith(_TRANSPOSED) and base not in src
        if transposed:  # dynamic mode turns Gemm into MatMul with the weight transposed
            base = base[: -len(_TRANSPOSED)]
        if base not in src and base.rstrip("0123456789") in src:
            base = base.rstrip(
                "0123456789"
            )  # ORT's copy of an initializer shared by several nodes: NAME0, NAME1...
        if base not in src:
            raise SourceError(
                f"quantized initializer {qname!r} has no fp32 source {base!r} in the exported model"
            )
        qv = numpy_helper.to_array(cur[qname])
        scale = numpy_helper.to_array(cur[scale_name]).astype(np.float64)
        zp = numpy_helper.to_array(cur[zp_name]).astype(np.float64) if zp_name is not None else np.zeros(())
        ax = ax if ax >= 0 else ax + qv.ndim
        info = np.iinfo(qv.dtype)
        w = numpy_helper.to_array(src[base]).astype(np.float64)
        w = w.T if transposed else w
        q = np.rint(w / _broadcast(scale, qv.ndim, ax)) + _broadcast(zp, qv.ndim, ax)
        put(qname, np.clip(q, info.min, info.max).astype(qv.dtype))
    return model.SerializeToString()


def ort_runner(runtime: nn.Module, state: State) -> Runner:
    """The runner of an ONNX Runtime scheme: its session with the measurement's threads."""
    assert isinstance(runtime, OrtModule)
    lat = state.recipe.measure.latency
    runtime.threads = lat.threads if lat is not None and lat.threads else torch.get_num_threads()
    return OrtRunner(runtime, runtime.threads)


@register_scheme("onnxruntime_int8")
class OnnxRuntimeInt8(Int8Handler):
    """Static (or, with ``mode: dynamic``, dynamic) int8 by ONNX Runtime on the model's ONNX export;
    runs in ONNX Runtime on CPU."""

    def quantizes_outputs(self, options: Any) -> bool:
        """Static QDQ quantizes a quantized node's output tensor too (the accuracy budget's
        sensitivity ranking then charges a layer for its output as well as its input)."""
        return options.mode == "static"

    def op_types(self, model: nn.Module, options: Any) -> list[str] | None:
        """The recipe's ``op_types_to_quantize`` (checked against what ONNX Runtime can quantize in
        the recipe's ``mode``), else the default for this model's family."""
        if options.op_types_to_quantize is None:
            return default_op_types(model)
        known = quantizable_op_types(options.mode)
        unknown = [t for t in options.op_types_to_quantize if t not in known]
        if unknown:
            raise StageError(
                f"op_types_to_quantize: ONNX Runtime cannot quantize {', '.join(unknown)} in mode "
                f"{options.mode} (it can: {', '.join(sorted(known))})"
            )
        return list(options.op_types_to_quantize)

    def way_out(self, options: Any) -> str:
        """The exporter, the op types, the mode, excluded layers, or the PT2E scheme."""
        return (
            "try exporter: dynamo (or torchscript), op_types_to_quantize: [MatMul, Gemm, Conv], "
            f"mode: {'static' if options.mode == 'dynamic' else 'dynamic'}, keep the layers involved in "
            "float (exclude: [module globs]), or scheme int8_static"
        )

    def snap(self, model: nn.Module, job: Int8Job) -> nn.Module:
        """Quantize ``model``'s ONNX export, snap ``model``'s weights to the grid ORT chose and record
        its scales in the entry (load() rebuilds the same graph from them)."""
        model = job.fold_batchnorm(model)
        options, details = job.options, job.details
        mode, ops = options.mode, self.op_types(model, options)
        spec = job.spec
        inputs: list[Any]
        if mode == "dynamic":  # no calibration: the fp32 export is checked on the SQNR batch
            first = job.trial if job.trial is not None else job.check[0] if job.check else None
            inputs = [first] if first is not None else []
            batches: list[Any] = []
        else:
            inputs = job.calibration()
            batches = [spec.arrays(b) for b in inputs]
        with tempfile.TemporaryDirectory(prefix="compress-onnx-") as d:
            # the fp32 ONNX (the model's size) waits on disk while ONNX Runtime quantizes it
            fp32 = Path(d) / "fp32.onnx"
            exporter = write_fp32_onnx(model, spec, fp32, options.opset, options.exporter)
            if isinstance(job.trial, torch.Tensor) and job.trial.is_floating_point():
                inputs = [job.trial, -job.trial]  # both signs: a branch on the input's sign shows
            check_onnx_follows(model, fp32, inputs[:2], spec)
            nodes = onnx_nodes_for_modules(fp32, job.exclude)
            q = ort_quantize(fp32, batches, job.reduce_range, options.calibrate_method, nodes, ops, mode)
            params, snapped = ort_record(q)
            del q
            derived = snap_onnx_weights_(model, fp32, snapped)
        # constants the exporter derived from parameters (e.g. Swin's gathered relative-position
        # bias) have no state-dict key: they stay fp32 in the checkpoint, and load() derives and
        # quantizes them again with the recorded scales, exactly as here
        if derived:
            details["derived_constants"] = derived
        details["quantized_tensors"] = len(snapped)
        details["mode"] = mode
        details["op_types_to_quantize"] = ops if ops is not None else "all"
        job.entry.update(
            onnx_qparams=params,
            opset=options.opset,
            exporter=exporter,
            exclude_nodes=nodes,
            op_types_to_quantize=ops,
            mode=mode,
        )
        return model

    def build_runtime(self, model: nn.Module, entry: dict[str, Any], device: Any = None) -> nn.Module:
        """Export the stored module again and rebuild the quantized graph with the recorded scales."""
        spec = InputSpec.from_entry(entry)
        with tempfile.TemporaryDirectory(prefix="compress-onnx-") as d:
            fp32 = Path(d) / "fp32.onnx"
            write_fp32_onnx(model, spec, fp32, entry.get("opset", 17), entry.get("exporter", "torchscript"))
            q = ort_requantize(
                fp32,
                entry["onnx_qparams"],
                entry["reduce_range"],
                spec,
                entry.get("exclude_nodes", []),
                entry.get("op_types_to_quantize"),
                entry.get("mode", "static"),
            )
        return OrtModule(q)

    def save(self, runtime: nn.Module, state: State, details: dict[str, Any]) -> list[str]:
        """The QDQ model as ``OUTPUT/model.onnx``, the file to deploy."""
        assert isinstance(runtime, OrtModule)
        path = state.ctx.output_dir / "model.onnx"
        runtime.save(path)
        details["onnx_file"] = str(path)
        details["onnx_bytes"] = len(runtime.onnx_bytes)
        return [str(path)]

    def runner(self, runtime: nn.Module, entry: dict[str, Any], state: State) -> Runner | None:
        """ONNX Runtime with the measurement's threads (load() leaves ONNX Runtime's default)."""
        return ort_runner(runtime, state)

    def export_model(self, fmt: str, state: State, entry: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """onnx: the quantized graph the runner measured, as it is."""
        if fmt != "onnx":
            return None, {}
        return state.runner.model.onnx_bytes, {"exporter": "onnxruntime_int8 (QDQ graph as quantized)"}


@register_scheme("onnxruntime_fp32")
class OnnxRuntimeFp32(SchemeHandler):
    """The fp32 model exported to ONNX and run in ONNX Runtime (a deployment choice of its own)."""

    def entry(self, state: State, options: Any) -> dict[str, Any]:
        """The scheme and the input spec (load() exports with it)."""
        from compress_cli.quantization.base import cpu_inputs

        spec = InputSpec.from_example(cpu_inputs(state.data.example_input(2)), state.model)
        return {"type": "quantize", "scheme": options.scheme, "input_spec": spec.to_json()}

    def build_runtime(self, model: nn.Module, entry: dict[str, Any], device: Any = None) -> nn.Module:
        """The fp32 ONNX export of the stored module (as the same-runtime baseline exports it)."""
        data, _ = fp32_onnx(model, InputSpec.from_entry(entry))
        return OrtModule(data)

    def runner(self, runtime: nn.Module, entry: dict[str, Any], state: State) -> Runner | None:
        """ONNX Runtime with the measurement's threads."""
        return ort_runner(runtime, state)

    def export_model(self, fmt: str, state: State, entry: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """onnx: the graph the runner measured."""
        if fmt != "onnx":
            return None, {}
        return state.runner.model.onnx_bytes, {"exporter": "onnxruntime_fp32 (the graph measured)"}
