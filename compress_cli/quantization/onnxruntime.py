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
from compress_cli.errors import SourceError
from compress_cli.quantization.base import Int8Handler, Int8Job
from compress_cli.quantization.schemes import register_scheme
from compress_cli.runtime.export import ONNX_INPUT, exporter_order, fp32_onnx
from compress_cli.runtime.ort import OrtModule
from compress_cli.runtime.runners import OrtRunner, Runner

if TYPE_CHECKING:
    from compress_cli.state import State

#: ``exporter: auto`` here: the TorchScript-based exporter first (much faster, and its initializers
#: keep their state-dict names), dynamo where it refuses an op
_AUTO_EXPORTERS = ("legacy", "dynamo")


def write_fp32_onnx(
    model: nn.Module, input_shape: Iterable[int], path: Path, opset: int, exporter: str
) -> str:
    """The fp32 ONNX of ``model`` written to ``path`` (ONNX Runtime's quantizer reads a file; the
    bytes are not held while it runs: they are the model's size again). Returns the exporter used,
    as the recipe and the manifest spell it."""
    data, used = fp32_onnx(
        model, input_shape, opset=opset, exporters=exporter_order(exporter, _AUTO_EXPORTERS)
    )
    Path(path).write_bytes(data)
    return "torchscript" if used == "legacy" else used


def load_onnx(src: bytes | Path) -> Any:
    """An ONNX ModelProto from file bytes or a path."""
    import onnx

    return onnx.load_from_string(src) if isinstance(src, bytes) else onnx.load(str(src))


def ort_quantize(
    fp32: bytes | Path,
    batches: list[Any],
    reduce_range: bool,
    method: str = "minmax",
    exclude_nodes: Iterable[str] = (),
) -> bytes:
    """ONNX Runtime ``quantize_static``: QDQ format, per-channel int8 weights, uint8 activations
    (the x86 "U8S8" layout), calibrated on ``batches`` (numpy arrays)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(batches)

        def get_next(self) -> dict[str, Any] | None:
            x = next(self.it, None)
            return None if x is None else {ONNX_INPUT: x}

    # nodes computing constants (Swin v2's cpb_mlp on its relative_coords_table buffer): quantizing
    # them buys nothing, and ORT quantizes a constant MatMul input as a weight, then shares it as an
    # activation through Identity nodes -> a DequantizeLinear bound to int8 and uint8 at load
    exclude = sorted(set(exclude_nodes) | set(constant_nodes(load_onnx(fp32).graph)))
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    with tempfile.TemporaryDirectory() as d, quiet():
        # from a file, not a ModelProto: ORT then loads the model once (given a proto, it saves and
        # reloads it, and ours stays alive too: two more copies of the weights at the peak)
        out = Path(d) / "q.onnx"
        if isinstance(fp32, bytes):
            (src := Path(d) / "fp32.onnx").write_bytes(fp32)
        else:
            src = fp32
        quantize_static(
            str(src),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[method],
            nodes_to_exclude=exclude or None,
            calibration_cache_path=None,
            extra_options={"CalibTensorRangeSymmetric": False},
        )
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


def _quantized_inits(model: Any) -> list[tuple[str, str, Any]]:
    """(quantized initializer, fp32 name it came from, DequantizeLinear node) of a QDQ model."""
    from onnx import TensorProto

    ints = {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT32, TensorProto.INT16, TensorProto.UINT16}
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        name = node.input[0]
        if inits[name].data_type in ints and name.endswith("_quantized"):
            out.append((name, name[: -len("_quantized")], node))
    return out


def ort_record(q: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """From a QDQ model: every scale / zero-point initializer (packed), and the dequantized value
    of every quantized weight/bias keyed by the fp32 initializer name it replaced."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(q)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    params: dict[str, Any] = {}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            for name in node.input[1:3]:
                if name in inits:
                    params[name] = pack_array(inits[name])
    snapped = {}
    for qname, base, node in _quantized_inits(model):
        qv = inits[qname]
        scale = inits[node.input[1]].astype(np.float32)
        zp = (
            inits[node.input[2]] if len(node.input) > 2 and node.input[2] in inits else np.zeros((), np.int64)
        )
        axis = _dq_axis(node)
        ax = axis if axis >= 0 else axis + qv.ndim
        codes = (qv.astype(np.float64) - _broadcast(zp.astype(np.float64), qv.ndim, ax)).astype(np.float32)
        snapped[base] = (codes * _broadcast(scale, qv.ndim, ax)).astype(np.float32) + np.float32(0)
    return params, snapped


def ort_requantize(
    fp32: bytes | Path,
    params: dict[str, Any],
    reduce_range: bool,
    input_shape: Iterable[int],
    exclude_nodes: Iterable[str] = (),
) -> bytes:
    """The QDQ int8 model for ``fp32`` (weights already on the grid) with the recorded scales:
    ``quantize_static`` on one dummy batch gives the graph; every scale / zero point is then
    replaced by the recorded one and every quantized initializer recomputed from the fp32 weights."""
    import onnx
    from onnx import numpy_helper

    dummy = [np.random.default_rng(0).standard_normal((2, *input_shape)).astype(np.float32)]
    model = onnx.load_from_string(ort_quantize(fp32, dummy, reduce_range, "minmax", exclude_nodes))
    # initializers as protos, each converted when used: all of them as arrays is the model's size again
    src = {i.name: i for i in load_onnx(fp32).graph.initializer}
    index = {i.name: k for k, i in enumerate(model.graph.initializer)}

    def put(name: str, value: np.ndarray) -> None:
        model.graph.initializer[index[name]].CopyFrom(numpy_helper.from_array(value, name))

    qparam_names = set()
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            qparam_names |= {n for n in node.input[1:3] if n in index}
    if qparam_names != set(params):
        raise SourceError(
            "the ONNX Runtime quantized graph differs from the recorded one (onnxruntime version change?): "
            f"recorded but absent {sorted(set(params) - qparam_names)[:3]}, "
            f"new {sorted(qparam_names - set(params))[:3]}"
        )
    for name, packed in params.items():
        put(name, unpack_array(packed))
    cur = {i.name: i for i in model.graph.initializer}  # put() updates these protos in place
    for qname, base, node in _quantized_inits(model):
        if base not in src and base.rstrip("0123456789") in src:
            base = base.rstrip(
                "0123456789"
            )  # ORT's copy of an initializer shared by several nodes: NAME0, NAME1...
        if base not in src:
            raise SourceError(
                f"quantized initializer {qname!r} has no fp32 source {base!r} in the exported model"
            )
        qv = numpy_helper.to_array(cur[qname])
        scale = numpy_helper.to_array(cur[node.input[1]]).astype(np.float64)
        zp = (
            numpy_helper.to_array(cur[node.input[2]]).astype(np.float64)
            if len(node.input) > 2 and node.input[2] in cur
            else np.zeros(())
        )
        ax = _dq_axis(node)
        ax = ax if ax >= 0 else ax + qv.ndim
        info = np.iinfo(qv.dtype)
        w = numpy_helper.to_array(src[base]).astype(np.float64)
        q = np.rint(w / _broadcast(scale, qv.ndim, ax)) + _broadcast(zp, qv.ndim, ax)
        put(qname, np.clip(q, info.min, info.max).astype(qv.dtype))
    return model.SerializeToString()


@register_scheme("onnxruntime_int8")
class OnnxRuntimeInt8(Int8Handler):
    """Static int8 by ONNX Runtime on the model's ONNX export; runs in ONNX Runtime on CPU."""

    def snap(self, model: nn.Module, job: Int8Job) -> nn.Module:
        """Quantize ``model``'s ONNX export, snap ``model``'s weights to the grid ORT chose and record
        its scales in the entry (load() rebuilds the same graph from them)."""
        model = job.fold_batchnorm(model)
        options, details = job.options, job.details
        batches = [b.detach().cpu().float().numpy() for b in job.calibration()]
        with tempfile.TemporaryDirectory(prefix="compress-onnx-") as d:
            # the fp32 ONNX (the model's size) waits on disk while ONNX Runtime quantizes it
            fp32 = Path(d) / "fp32.onnx"
            exporter = write_fp32_onnx(model, job.entry["input_shape"], fp32, options.opset, options.exporter)
            nodes = onnx_nodes_for_modules(fp32, job.exclude)
            q = ort_quantize(fp32, batches, job.reduce_range, options.calibrate_method, nodes)
            params, snapped = ort_record(q)
            del q
            sd = model.state_dict()
            where = {k: (k, False) for k in snapped if k in sd}
            where.update(initializer_sources(fp32, [k for k in snapped if k not in sd], sd))
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
        job.entry.update(onnx_qparams=params, opset=options.opset, exporter=exporter, exclude_nodes=nodes)
        return model

    def build_runtime(self, model: nn.Module, entry: dict[str, Any], device: Any = None) -> nn.Module:
        """Export the stored module again and rebuild the QDQ graph with the recorded scales."""
        with tempfile.TemporaryDirectory(prefix="compress-onnx-") as d:
            fp32 = Path(d) / "fp32.onnx"
            write_fp32_onnx(
                model,
                entry["input_shape"],
                fp32,
                entry.get("opset", 17),
                entry.get("exporter", "torchscript"),
            )
            q = ort_requantize(
                fp32,
                entry["onnx_qparams"],
                entry["reduce_range"],
                entry["input_shape"],
                entry.get("exclude_nodes", []),
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
        assert isinstance(runtime, OrtModule)
        lat = state.recipe.measure.latency
        runtime.threads = lat.threads if lat is not None and lat.threads else torch.get_num_threads()
        return OrtRunner(runtime, runtime.threads)

    def export_model(self, fmt: str, state: State, entry: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """onnx: the quantized graph the runner measured, as it is."""
        if fmt != "onnx":
            return None, {}
        return state.runner.model.onnx_bytes, {"exporter": "onnxruntime_int8 (QDQ graph as quantized)"}
