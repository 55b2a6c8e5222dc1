"""openvino_int8 and openvino_fp32: the model converted to OpenVINO, NNCF post-training int8 on it.

``openvino_int8`` folds batch norm into the convolutions (OpenVINO's converter fuses conv + BN
into nodes named ``Multiply_N``, which loses the module names that ``exclude`` matches), converts
the model with ``openvino.convert_model`` and quantizes the OpenVINO model with NNCF's
``nncf.quantize`` (its OpenVINO backend: the one NNCF documents for deployment; its torch backend
does not run on torch 2.14), fast bias correction on, ``subset_size`` = the calibration batches,
``ModelType.TRANSFORMER`` for models with attention or embeddings. ``exclude`` becomes an
``nncf.IgnoredScope`` over the OpenVINO node names, which carry the module path
(``__module.layer1.0.conv1/aten::_convolution/Convolution``).

What the checkpoint stores: the module with BN folded and every weight NNCF quantized put on
NNCF's grid. NNCF compresses each weight FakeQuantize into ``Constant(int8) -> Convert ->
Multiply(scale)`` (symmetric, one scale per output channel: max|w| / 127, codes -127..127; on the
first layer its overflow fix uses half the range, max|w| / 63.5); the stored weight is
``codes * scale`` in float32, exactly what OpenVINO computes, so the codec stores it at 8 bits a
value (``rowgrid``). Weights whose codes are not their own rounding (SmoothQuant's rescaled MatMul
weights in transformer mode) stay as they were and are listed in the details
(``weights_not_snapped``).

What load() rebuilds: the stored module converted again and quantized again on one dummy batch;
NNCF derives the same int8 codes and scales from the snapped weights (but the first layer's: its
snapped maximum is 64 * scale, not 63.5 * scale, so its codes and scales are recorded), then
every constant that differs from the calibrated model's (activation ranges, bias corrections) is
put back from the entry, where the stage recorded it. The stage runs that same rebuild before it
records, so what it records is exactly what load() needs. Calibration and fast bias correction
see the fp32 weights, as NNCF used directly does; the int8 weights they produce are the snapped
ones.

``max_accuracy_drop`` (quantization/budget.py) works through ``exclude``: each fallback step
converts again with the most sensitive layers in the ignored scope, and the entry's ``exclude``
lets load() rebuild the kept step. NNCF's own ``quantize_with_accuracy_control`` is not used: it
is the same greedy loop (revert the most harmful quantizers until the drop fits) run inside NNCF
on the calibrated graph, which load() could not rebuild from the stored module, and it returns
its last model, not the best one, when the drop is not met.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from compress_cli._utils.arrays import pack_array, unpack_array
from compress_cli._utils.quiet import quiet
from compress_cli.errors import SourceError, StageError
from compress_cli.quantization.base import Int8Handler, Int8Job, Quantized, SchemeHandler
from compress_cli.quantization.schemes import register_scheme
from compress_cli.runtime import openvino as ovrt
from compress_cli.runtime.inputs import InputSpec
from compress_cli.runtime.openvino import INSTALL, OvModule, ir_bytes, ov_convert, signal_stack_kept
from compress_cli.runtime.runners import OpenVinoRunner, Runner

if TYPE_CHECKING:
    from compress_cli.state import State


def require_nncf() -> Any:
    """``import nncf``, or a located error saying how to install it."""
    try:
        import nncf
    except ImportError:
        raise StageError(f"scheme openvino_int8 needs NNCF, which is not installed: {INSTALL}") from None
    return nncf


def node_patterns(modules: list[str]) -> list[str]:
    """``nncf.IgnoredScope`` patterns (regexes over OpenVINO node names) for the ops of ``modules``
    and of everything inside them."""
    return [rf"__module\.{re.escape(m)}[/.].*" for m in modules]


def ignored_nodes(ov_model: Any, modules: list[str]) -> dict[str, list[str]]:
    """module -> the OpenVINO node names its pattern matches (what NNCF will keep in float)."""
    names = [op.get_friendly_name() for op in ov_model.get_ordered_ops()]
    return {
        m: [n for n in names if re.fullmatch(p, n)]
        for m, p in zip(modules, node_patterns(modules), strict=True)
    }


def _feed(spec: InputSpec) -> Any:
    def transform(x: Any) -> Any:
        values = list(spec.arrays(x).values())
        return values[0] if len(values) == 1 else values

    return transform


def nncf_quantize(
    ov_model: Any, spec: InputSpec, batches: list[Any], exclude: list[str], transformer: bool
) -> Any:
    """NNCF post-training int8 of ``ov_model`` calibrated on ``batches`` (model inputs of ``spec``'s
    structure); ``exclude``: module names kept in float."""
    nncf = require_nncf()
    kw: dict[str, Any] = {}
    if exclude:
        kw["ignored_scope"] = nncf.IgnoredScope(patterns=node_patterns(exclude), validate=False)
    if transformer:
        kw["model_type"] = nncf.ModelType.TRANSFORMER
    with quiet(), signal_stack_kept():  # NNCF makes and destroys Cores of its own
        return nncf.quantize(
            ov_model,
            nncf.Dataset(batches, _feed(spec)),
            subset_size=len(batches),
            fast_bias_correction=True,
            **kw,
        )


def _constants(ov_model: Any) -> list[Any]:
    return [op for op in ov_model.get_ordered_ops() if op.get_type_name() == "Constant"]


def _key(node: Any) -> str:
    """A constant's name with OpenVINO's per-process counters (``Constant_14257``) taken out."""
    return re.sub(r"_\d+$", "_N", node.get_friendly_name())


def constant_diff(calibrated: Any, rebuilt: Any) -> dict[str, Any]:
    """The constants of ``calibrated`` that differ from ``rebuilt``'s (the same graph quantized on a
    dummy batch), by position: ``{index: {"name", "value"}}`` (values packed)."""
    a, b = _constants(calibrated), _constants(rebuilt)
    if [(_key(c), c.get_output_shape(0)) for c in a] != [(_key(c), c.get_output_shape(0)) for c in b]:
        raise StageError(
            "openvino_int8: NNCF quantizes this model into a different graph on a dummy batch than on "
            "the calibration data, so load() could not rebuild it; use scheme onnxruntime_int8 or int8_static"
        )
    out = {}
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        va, vb = x.get_data(), y.get_data()
        if va.shape != vb.shape or va.dtype != vb.dtype or not np.array_equal(va, vb):
            out[str(i)] = {"name": _key(x), "value": pack_array(np.array(va))}
    return out


def put_constants(ov_model: Any, recorded: dict[str, Any]) -> Any:
    """``ov_model`` with the recorded constants put back (SourceError when the graph differs)."""
    import openvino as ov

    consts = _constants(ov_model)
    for key, rec in recorded.items():
        i = int(key)
        if i >= len(consts) or _key(consts[i]) != rec["name"]:
            raise SourceError(
                f"the OpenVINO int8 graph differs from the recorded one at constant {rec['name']!r} "
                "(openvino or nncf version change?)"
            )
        new = ov.op.Constant(unpack_array(rec["value"]))
        new.set_friendly_name(consts[i].get_friendly_name())
        for target in list(consts[i].output(0).get_target_inputs()):
            target.replace_source_output(new.output(0))
    ov_model.validate_nodes_and_infer_types()
    return ov_model


def weight_sources(ov_model: Any) -> dict[tuple[str, int], str]:
    """(consumer node name, input port) -> the name of the Constant feeding it, for every input an
    fp32 graph takes from a constant (``openvino.convert_model`` names a parameter's constant
    ``self.<parameter path>``; a constant it folded, e.g. a depthwise kernel's reshape, keeps the
    name of the op it came from)."""
    out = {}
    for op in ov_model.get_ordered_ops():
        for i, inp in enumerate(op.inputs()):
            src = inp.get_source_output().get_node()
            if src.get_type_name() == "Constant":
                out[(op.get_friendly_name(), i)] = src.get_friendly_name()
    return out


def int8_weights(ov_model: Any) -> list[tuple[str, int, np.ndarray, np.ndarray]]:
    """The weights NNCF quantized in ``ov_model``: ``(consumer node, input port, int8 codes, scale)``
    for each ``Constant(int8) -> Convert -> Multiply(scale)``: the symmetric grid its weight
    FakeQuantize was compressed into (``codes * scale`` in float32 is the weight the runtime uses)."""
    out = []
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() != "Multiply":
            continue
        conv, scale = (op.input_value(i).get_node() for i in (0, 1))
        if conv.get_type_name() != "Convert" or scale.get_type_name() != "Constant":
            continue
        codes = conv.input_value(0).get_node()
        if codes.get_type_name() != "Constant" or codes.get_data().dtype != np.int8:
            continue
        for target in op.output(0).get_target_inputs():
            node = target.get_node()
            out.append((node.get_friendly_name(), target.get_index(), codes.get_data(), scale.get_data()))
    return out


def _param_for(consumer: str, const: str | None, params: dict[str, nn.Parameter], n: int) -> str | None:
    """The parameter of ``n`` values a quantized weight came from: the constant's own name
    (``self.<path>``), else the ``weight`` of the module its consumer node is named after."""
    names = [const[5:]] if const is not None and const.startswith("self.") else []
    m = re.match(r"__module\.(.+?)/", consumer)
    names += [f"{m.group(1)}.weight"] if m else []
    return next((k for k in names if k in params and params[k].numel() == n), None)


def snap_ov_weights_(model: nn.Module, fp32: Any, quantized: Any) -> tuple[list[str], list[str]]:
    """Write the weights NNCF quantized in ``quantized`` (an int8 graph of ``fp32``, the graph of
    ``model``) into ``model`` as ``codes * scale`` in float32 (what OpenVINO computes; rows that
    are exact multiples of one scale, which the checkpoint codec stores at 8 bits a value).
    -> (parameters snapped, consumer nodes whose weight was left as it is: no parameter maps to it,
    or the codes are not its rounding, e.g. a weight SmoothQuant rescaled)."""
    params = dict(model.named_parameters())
    sources = weight_sources(fp32)
    snapped, left = [], []
    for consumer, port, codes, scale in int8_weights(quantized):
        name = _param_for(consumer, sources.get((consumer, port)), params, codes.size)
        if name is None or name in snapped:  # a tied weight takes its first consumer's grid only
            left.append(consumer)
            continue
        p = params[name]
        w = p.detach().cpu().float().numpy().reshape(codes.shape)
        grid = codes.astype(np.float32) * scale.astype(np.float32)
        if not (np.abs(w - grid) <= np.abs(scale) * np.float32(0.5 + 1e-3)).all():
            left.append(consumer)
            continue
        with torch.no_grad():
            p.copy_(torch.from_numpy(np.ascontiguousarray(grid)).reshape(p.shape))
        snapped.append(name)
    return snapped, left


def _dummy(spec: InputSpec) -> list[Any]:
    return [spec.example(2, rng=np.random.default_rng(0))]


def _convert_example(spec: InputSpec) -> Any:
    """What the model is traced on, at the stage and at load(): the same deterministic inputs."""
    return spec.example(2, rng=np.random.default_rng(0))


def precision_of(options: Any) -> str:
    """The ``inference_precision`` the stage's ``options`` ask for (f32 unless set)."""
    return str(getattr(options, "inference_precision", "f32"))


def check_precision(options: Any) -> None:
    """StageError, naming the key, when ``inference_precision: bf16`` is asked on a CPU without
    bf16 units (OpenVINO would compile it as f32: not what the recipe says it measured)."""
    if precision_of(options) == "bf16" and not ovrt.bf16_supported():
        raise StageError(
            f"inference_precision: bf16 (scheme {options.scheme}) needs a CPU with bf16 units "
            "(AVX512_BF16 or AMX); OpenVINO's CPU OPTIMIZATION_CAPABILITIES list no BF16 here; "
            "set inference_precision: f32, or let scheme auto measure the precisions this CPU has"
        )


def _runtime(ov_model: Any, entry: dict[str, Any]) -> OvModule:
    """``ov_model`` as the module that runs, compiled with the entry's ``inference_precision``
    (f32 for entries written before it was recorded)."""
    return OvModule(ov_model, precision=str(entry.get("inference_precision", "f32")))


def _threads(state: State) -> int:
    lat = state.recipe.measure.latency
    return lat.threads if lat is not None and lat.threads else torch.get_num_threads()


@register_scheme("openvino_int8")
class OpenVinoInt8(Int8Handler):
    """NNCF post-training int8 on the OpenVINO model; runs in OpenVINO on CPU."""

    def way_out(self, options: Any) -> str:
        """Excluded layers, f32 inference (OpenVINO's bf16 CPU path has refused int8 graphs that
        compile in f32: "No suitable implementations"), or the other CPU int8 schemes."""
        bf16 = "inference_precision: f32, " if precision_of(options) == "bf16" else ""
        return (
            f"{bf16}keep the layers involved in float (exclude: [module globs]), "
            "or use scheme onnxruntime_int8 or int8_static"
        )

    def snap(self, model: nn.Module, job: Int8Job) -> nn.Module:
        """Fold BN, convert, quantize with NNCF, and record what a dummy-batch rebuild gets wrong."""
        from compress_cli.quantization.onnxruntime import is_transformer_like

        require_nncf()
        model = job.fold_batchnorm(model)
        spec = job.spec
        batches = job.calibration()
        om, _, _ = ov_convert(model, _convert_example(spec))
        found = ignored_nodes(om, job.exclude)
        empty = [m for m, nodes in found.items() if not nodes]
        if empty:
            raise StageError(
                f"exclude: module {empty[0]} has no OpenVINO node named after it (the converter fused "
                "or renamed its ops); exclude the module that contains it"
            )
        job.entry.pop("reduce_range", None)  # OpenVINO's int8 kernels choose for themselves
        job.details.pop("reduce_range", None)
        job.details.pop("reduce_range_reason", None)
        transformer = is_transformer_like(model)
        calibrated = nncf_quantize(om, spec, batches, job.exclude, transformer)
        snapped, left = snap_ov_weights_(model, om, calibrated)
        # a preflight's trial builds the runtime on its own dummy-batch rebuild: nothing to record
        rebuilt = (
            calibrated if job.trial is not None else self._rebuild(model, spec, job.exclude, transformer)
        )
        job.entry.update(
            ov_constants=constant_diff(calibrated, rebuilt),
            transformer=transformer,
            inference_precision=precision_of(job.options),
        )
        job.details.update(
            model_type="transformer" if transformer else "default",
            inference_precision=precision_of(job.options),
            ignored_nodes=sum(len(v) for v in found.values()),
            fake_quantize=sum(
                1 for op in calibrated.get_ordered_ops() if op.get_type_name() == "FakeQuantize"
            ),
            recorded_constants=len(job.entry["ov_constants"]),
            recorded_bytes=sum(unpack_array(r["value"]).nbytes for r in job.entry["ov_constants"].values()),
            quantized_weights=len(snapped),
        )
        if left:
            job.details["weights_not_snapped"] = left  # int8 at run time, stored as they were
        return model

    def _rebuild(self, model: nn.Module, spec: InputSpec, exclude: list[str], transformer: bool) -> Any:
        om, _, _ = ov_convert(model, _convert_example(spec))
        return nncf_quantize(om, spec, _dummy(spec), exclude, transformer)

    def build_runtime(self, model: nn.Module, entry: dict[str, Any], device: Any = None) -> nn.Module:
        """Convert and quantize the stored module on a dummy batch, then put the recorded constants back."""
        spec = InputSpec.from_entry(entry)
        rebuilt = self._rebuild(model, spec, list(entry.get("exclude", [])), bool(entry.get("transformer")))
        return _runtime(put_constants(rebuilt, entry.get("ov_constants", {})), entry)

    def preflight(self, state: State, options: Any) -> None:
        """``inference_precision`` available on this CPU, then the int8 trial conversion."""
        check_precision(options)
        super().preflight(state, options)

    def save(self, runtime: nn.Module, state: State, details: dict[str, Any]) -> list[str]:
        """The int8 IR as ``OUTPUT/model.xml`` + ``model.bin``, the files to deploy."""
        assert isinstance(runtime, OvModule)
        paths = runtime.save(state.ctx.output_dir / "openvino" / "model.xml")
        details["openvino_file"] = str(paths[0])
        details["openvino_bytes"] = sum(p.stat().st_size for p in paths)
        return [str(p) for p in paths]

    def runner(self, runtime: nn.Module, entry: dict[str, Any], state: State) -> Runner | None:
        """OpenVINO with the measurement's threads."""
        assert isinstance(runtime, OvModule)
        runtime.threads = _threads(state)
        return OpenVinoRunner(runtime, runtime.threads)

    def export_model(self, fmt: str, state: State, entry: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """openvino: the int8 model the runner measured, as it is."""
        if fmt != "openvino":
            return None, {}
        return state.runner.model, {
            "converter": "openvino_int8 (NNCF FakeQuantize graph as quantized)",
            "inference_precision": entry.get("inference_precision", "f32"),  # a compile option, not in the IR
        }


@register_scheme("openvino_fp32")
class OpenVinoFp32(SchemeHandler):
    """The fp32 model converted to OpenVINO (a deployment choice of its own: no quantization)."""

    def entry(self, state: State, options: Any) -> dict[str, Any]:
        """The scheme, the input spec and the inference precision (load() converts and compiles
        with them)."""
        from compress_cli.quantization.base import cpu_inputs

        spec = InputSpec.from_example(cpu_inputs(state.data.example_input(2)), state.model)
        return {
            "type": "quantize",
            "scheme": options.scheme,
            "input_spec": spec.to_json(),
            "inference_precision": precision_of(options),
        }

    def preflight(self, state: State, options: Any) -> None:
        """OpenVINO installed, ``inference_precision`` available on this CPU."""
        from compress_cli.runtime.openvino import require_openvino

        require_openvino(f"scheme {options.scheme}")
        check_precision(options)

    def build_runtime(self, model: nn.Module, entry: dict[str, Any], device: Any = None) -> nn.Module:
        """``openvino.convert_model`` of the stored module (CPU fp32 copy when it is elsewhere)."""
        import copy

        spec = InputSpec.from_entry(entry)
        ready = all(t.device.type == "cpu" and t.dtype == torch.float32 for t in model.parameters())
        work = model if ready else copy.deepcopy(model).cpu().float()
        om, _, _ = ov_convert(work, _convert_example(spec))
        return _runtime(om, entry)

    def runner(self, runtime: nn.Module, entry: dict[str, Any], state: State) -> Runner | None:
        """OpenVINO with the measurement's threads."""
        assert isinstance(runtime, OvModule)
        runtime.threads = _threads(state)
        return OpenVinoRunner(runtime, runtime.threads)

    def convert(self, state: State, options: Any, label: str) -> Quantized:
        """Convert; the model stays as it is (the checkpoint is the fp32 module)."""
        done = super().convert(state, options, label)
        assert state.runner is not None
        precision = precision_of(options)
        done.notes = f"{options.scheme} -> openvino (fp32 weights, {precision} inference, not quantized)"
        done.details["openvino_bytes"] = ir_bytes(state.runner.model)
        done.details["inference_precision"] = precision
        return done

    def export_model(self, fmt: str, state: State, entry: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """openvino: the converted model the runner measured."""
        if fmt != "openvino":
            return None, {}
        return state.runner.model, {
            "converter": "openvino.convert_model",
            "inference_precision": entry.get("inference_precision", "f32"),  # a compile option, not in the IR
        }
