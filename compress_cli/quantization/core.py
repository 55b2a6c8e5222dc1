"""Quantization algorithms: the ONE module that touches torch.ao, torchao and ONNX Runtime's quantizer.

``torch.ao.quantization`` is deprecated upstream and PT2E moved to torchao; keeping every use here
means a later move touches this file only. The ``quantize`` stage and the ``quantize`` load
transform both call :func:`rebuild`, so what ``compress_cli.load()`` returns is built by the same
deterministic function, from the same inputs, as the module the report measured.

How a quantized model is stored (see docs of each scheme below):

* the checkpoint holds an ordinary ``nn.Module`` (batch norm folded into the convolutions where the
  scheme folds it) whose weights are the fp32 values *snapped to the int8 grid* — the checkpoint's
  palette encoding then stores them at 8 bits per weight;
* the quantization parameters that cannot be re-derived from those weights (activation scales and
  zero points, per-channel weight scales) are recorded in the manifest's ``transforms`` entry,
  arrays base64-encoded;
* :func:`rebuild` turns (snapped module, entry) into the runtime module:

  ================  ============================================================================
  scheme            what ``rebuild`` / ``load()`` returns
  ================  ============================================================================
  int8_dynamic      eager module with ``torch.ao`` dynamic int8 Linear/LSTM (CPU)
  int8_static, qat  :class:`QuantizedGraph`: torchao PT2E int8 graph, run through ``torch.compile``
                    (inductor, freezing on; compiled on first call per batch size), or the
                    graph in eager when the stage had ``compile: false``;
                    int8_static with ``backend: fx``: torch.ao FX ``convert_fx`` module (eager)
  onnxruntime_int8  :class:`OrtModule`: an ``nn.Module`` wrapping an ONNX Runtime CPU session
                    over the QDQ int8 model (``.onnx_bytes`` holds the file); tensors in and out
  int8/int4_weight_only  module with torchao weight-only quantized Linear weights (CUDA only)
  fp16, bf16        the module in that dtype; hooks cast inputs to it and logits back to fp32
  ================  ============================================================================
"""

from __future__ import annotations

import base64
import contextlib
import copy
import functools
import io
import logging
import platform
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compress_cli.errors import SourceError, StageError

if TYPE_CHECKING:
    import numpy as np

INT8_CPU_SCHEMES = ("int8_dynamic", "int8_static", "qat", "onnxruntime_int8")
CUDA_SCHEMES = ("int8_weight_only", "int4_weight_only")
CAST_SCHEMES = ("fp16", "bf16")
SCHEMES = INT8_CPU_SCHEMES + CUDA_SCHEMES + CAST_SCHEMES
#: schemes after which the model is a converted inference model (nothing may train after them)
FREEZING_SCHEMES = INT8_CPU_SCHEMES + CUDA_SCHEMES
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
ONNX_INPUT, ONNX_OUTPUT = "input", "logits"


# --------------------------------------------------------------------------- small helpers
@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the libraries' warnings, logging and stdout (stages never print)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def pack_array(a: Any) -> dict[str, Any]:
    """A numpy array / tensor as JSON: dtype, shape and the raw bytes in base64 (exact)."""
    import numpy as np
    import torch

    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.array(a, order="C")  # not ascontiguousarray: it turns a 0-d scale into shape [1]
    return {
        "dtype": str(a.dtype),
        "shape": list(a.shape),
        "b64": base64.b64encode(a.tobytes()).decode("ascii"),
    }


def unpack_array(d: dict[str, Any]) -> np.ndarray:
    import numpy as np

    return np.frombuffer(base64.b64decode(d["b64"]), dtype=np.dtype(d["dtype"])).reshape(d["shape"]).copy()


def sqnr_db(reference: torch.Tensor, output: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``output`` against ``reference`` in dB (capped at 200)."""
    import math

    ref = reference.detach().float().cpu()
    noise = float((ref - output.detach().float().cpu()).pow(2).mean())
    signal = float(ref.pow(2).mean())
    if noise == 0:
        return 200.0
    if signal == 0:
        return -200.0
    return round(min(200.0, 10 * math.log10(signal / noise)), 2)


# --------------------------------------------------------------------------- CPU features
def cpu_flags() -> set[str] | None:
    """The x86 feature flags of /proc/cpuinfo, or None where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return None


def choose_reduce_range(flags: set[str] | None = None, machine: str | None = None) -> tuple[bool, str]:
    """Whether int8 kernels need 7-bit activations (``reduce_range``) on this CPU, and why.

    x86 int8 GEMMs without VNNI multiply u8*s8 pairs with ``vpmaddubsw``, whose int16 sums saturate
    on full 8-bit activations: compiled int8 silently degrades (8 dB logit SQNR measured on an AVX2
    CPU without VNNI). VNNI (AVX512-VNNI, AVX-VNNI) and AMX accumulate in int32 and need no reduction.
    """
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False, f"{machine} CPU: the x86 u8*s8 overflow does not apply, full 8-bit activations"
    if flags is None:
        flags = cpu_flags()
    if flags is None:
        return True, "CPU feature flags unreadable: reduce_range on (7-bit activations), the safe choice"
    have = [f for f in VNNI_FLAGS if f in flags]
    if have:
        return False, f"CPU has {', '.join(have)}: int32 accumulation, full 8-bit activations"
    return True, (
        "CPU has no VNNI/AMX (avx512_vnni, avx_vnni, amx_int8): reduce_range on (7-bit activations) "
        "so u8*s8 products cannot saturate int16"
    )


# --------------------------------------------------------------------------- pruning
def strip_pruning(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with torch.nn.utils.prune's reparametrizations made permanent
    (``weight = weight_orig * weight_mask`` becomes a plain parameter; zeros stay zeros, and
    quantize to exactly zero). Nothing trains after an int8 conversion, so masks need not hold."""
    from compress_cli.checkpoint import copy_model
    from compress_cli.pruning import make_permanent

    model = copy_model(model)
    make_permanent(model)
    return model


# --------------------------------------------------------------------------- batch-norm folding
def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, batch norm) module pairs where the BN reads only that conv's output (torch.fx trace)."""
    import torch
    from torch import nn

    mods = dict(model.named_modules())
    bns = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    if not any(isinstance(m, bns) for m in mods.values()):
        return []
    try:
        with quiet():
            gm = torch.fx.symbolic_trace(model)
    except Exception as e:
        raise StageError(
            f"cannot fold batch norm into convolutions: torch.fx cannot trace the model ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    convs = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), bns):
            continue
        src: Any = node.args[0] if node.args else None
        if getattr(src, "op", None) != "call_module" or len(src.users) != 1:
            continue
        conv, bn = mods.get(src.target), mods[node.target]
        dims = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}[type(bn)]
        if type(conv) is not convs[dims] or calls[src.target] != 1 or calls[node.target] != 1:
            continue
        if bn.track_running_stats and bn.running_mean is not None:
            pairs.append((src.target, node.target))
    return pairs


def fold_batchnorm(model: nn.Module, inplace: bool = False) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` (eval mode, CPU) with each conv->BN pair folded: the conv gets the BN's
    affine map (and a bias), the BN becomes ``nn.Identity`` — standard layers, so the checkpoint's
    architecture diff records and rebuilds them without special code. ``inplace``: fold ``model``
    itself (a caller's own copy), not a copy of it."""
    import torch
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = (model if inplace else copy.deepcopy(model)).cpu().eval()
    folded = []
    with torch.no_grad():
        for conv_name, bn_name in conv_bn_pairs(model):
            fused = fuse_conv_bn_eval(model.get_submodule(conv_name), model.get_submodule(bn_name))  # type: ignore[type-var,arg-type]
            _set_submodule(model, conv_name, fused)
            _set_submodule(model, bn_name, nn.Identity())
            folded.append(f"{conv_name}+{bn_name}")
    return model, folded


# --------------------------------------------------------------------------- PT2E (torchao)
def _pt2e() -> Any:
    """torchao's PT2E API (or torch.ao's, on older torch) as one namespace."""
    import types

    try:
        with quiet():  # torchao's import logs a torch deprecation warning
            from torchao.quantization import pt2e as base
            from torchao.quantization.pt2e import quantize_pt2e as qp
            from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

        return types.SimpleNamespace(
            prepare=qp.prepare_pt2e,
            prepare_qat=qp.prepare_qat_pt2e,
            convert=qp.convert_pt2e,
            xiq=xiq,
            allow_train_eval=base.allow_exported_model_train_eval,
            where="torchao.quantization.pt2e",
        )
    except ImportError:
        pass
    try:  # torch < 2.10 still shipped PT2E in torch.ao
        from torch.ao.quantization import allow_exported_model_train_eval  # type: ignore[attr-defined]
        from torch.ao.quantization import quantize_pt2e as qp  # type: ignore[attr-defined]
        from torch.ao.quantization.quantizer import x86_inductor_quantizer as xiq  # type: ignore[attr-defined]

        return types.SimpleNamespace(
            prepare=qp.prepare_pt2e,
            prepare_qat=qp.prepare_qat_pt2e,
            convert=qp.convert_pt2e,
            xiq=xiq,
            allow_train_eval=allow_exported_model_train_eval,
            where="torch.ao.quantization.quantize_pt2e",
        )
    except ImportError:
        raise StageError(
            "int8_static/qat need the PT2E quantization flow, which moved to torchao: pip install 'torchao>=0.12'"
        ) from None


def export_graph(model: nn.Module, example: torch.Tensor) -> Any:
    """``torch.export.export(strict=True)`` with a dynamic batch dimension -> GraphModule.

    strict: the default non-strict export makes ``prepare_pt2e`` fail with "Input partition has
    more than one output node" on models that reuse a module (e.g. torchvision's BasicBlock.relu).
    """
    import torch

    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    try:
        with quiet():
            ep = torch.export.export(model.eval(), (example,), strict=True, dynamic_shapes=({0: batch},))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise StageError(
            f"torch.export.export(strict=True) failed ({type(e).__name__}: {first}); the PT2E int8 flow needs "
            "an exportable model with a dynamic batch dimension (scheme onnxruntime_int8 or int8_dynamic may still work)"
        ) from None
    return ep.module()


def x86_quantizer(reduce_range: bool, is_qat: bool = False, exclude: Iterable[str] = ()) -> Any:
    """X86InductorQuantizer: per-channel symmetric int8 weights, affine uint8 activations."""
    api = _pt2e()
    q = api.xiq.X86InductorQuantizer()
    q.set_global(
        api.xiq.get_default_x86_inductor_quantization_config(is_qat=is_qat, reduce_range=reduce_range)
    )
    for name in exclude:
        q.set_module_name_qconfig(name, None)
    return q


def _observer_nodes(gm: Any) -> list[tuple[str, Any, Any]]:
    """(key, node, observer module) of every observer / fake-quantize in a prepared graph.

    The key is the observer's position plus what it observes (a weight's state key, or the op that
    produced the activation): the same for a PTQ-prepared and a QAT-prepared export of one module,
    whose node *names* differ (move_exported_model_to_eval renames the dropout nodes)."""
    out: list[tuple[str, Any, Any]] = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if not hasattr(mod, "calculate_qparams"):
            continue
        src = node.args[0]
        what = (
            src.target
            if getattr(src, "op", None) in ("get_attr", "placeholder")
            else str(getattr(src, "target", src))
        )
        out.append((f"{len(out):03d} {what}", node, mod))
    return out


def record_qparams(gm: Any) -> dict[str, dict[str, Any]]:
    """Scale / zero point of every observer (after calibration or QAT), keyed by observed edge;
    ``param`` names the weight an observer quantizes (a get_attr target = the module's state key)."""
    import torch

    out = {}
    for key, node, mod in _observer_nodes(gm):
        scale, zp = mod.calculate_qparams()
        src = node.args[0]
        per_channel = mod.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine)
        out[key] = {
            "scale": pack_array(scale.float()),
            "zero_point": pack_array(zp.to(torch.int64)),
            "param": src.target if getattr(src, "op", None) == "get_attr" else None,
            "axis": int(mod.ch_axis) if per_channel else None,
            "quant_min": int(mod.quant_min),
            "quant_max": int(mod.quant_max),
        }
    return out


def snap_(t: torch.Tensor, scale: Any, zero_point: Any, axis: int | None, qmin: int, qmax: int) -> None:
    """Replace ``t`` in place by its values on the integer grid (fake quantization)."""
    import torch

    s = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
    z = torch.as_tensor(zero_point).reshape(-1)
    with torch.no_grad():
        if axis is None:
            q = torch.fake_quantize_per_tensor_affine(t.data.float(), float(s[0]), int(z[0]), qmin, qmax)
        else:
            q = torch.fake_quantize_per_channel_affine(t.data.float(), s, z.to(torch.int32), axis, qmin, qmax)
        t.data.copy_(q.to(t.dtype) + 0.0)  # + 0.0 turns -0.0 into 0.0 (codes * scale gives no -0.0)


def snap_pt2e_weights_(model: nn.Module, qparams: dict[str, dict[str, Any]]) -> int:
    """Snap every weight a PT2E observer quantizes; returns how many tensors."""
    params = dict(model.named_parameters())
    n = 0
    for p in qparams.values():
        if p["param"] is None:
            continue
        if p["param"] not in params:
            raise StageError(
                f"quantized weight {p['param']!r} is not a parameter of the model (cannot store it)"
            )
        snap_(
            params[p["param"]],
            unpack_array(p["scale"]),
            unpack_array(p["zero_point"]),
            p["axis"],
            p["quant_min"],
            p["quant_max"],
        )
        n += 1
    return n


def pt2e_calibrate(
    model: nn.Module, batches: list[torch.Tensor], reduce_range: bool, exclude: Iterable[str] = ()
) -> dict[str, dict[str, Any]]:
    """Export, ``prepare_pt2e`` with X86InductorQuantizer, run the calibration batches; -> qparams."""
    import torch

    api = _pt2e()
    gm = export_graph(model, batches[0][:2] if len(batches[0]) >= 2 else torch.cat([batches[0]] * 2))
    with quiet():
        pm = api.prepare(gm, x86_quantizer(reduce_range, False, exclude))
        with torch.no_grad():
            for x in batches:
                pm(x)
    return record_qparams(pm)


def prepare_qat(
    model: nn.Module, example: torch.Tensor, reduce_range: bool, exclude: Iterable[str] = ()
) -> Any:
    """A QAT-prepared exported graph (fake quantization) that ``training.train`` can train:
    ``.train()`` / ``.eval()`` switch dropout/BN through torchao's move_exported_model_to_*."""
    api = _pt2e()
    gm = export_graph(model, example)
    with quiet():
        pm = api.prepare_qat(gm, x86_quantizer(reduce_range, True, exclude))
    api.allow_train_eval(pm)
    return pm


def copy_trained_(graph: Any, model: nn.Module) -> None:
    """Copy the parameters trained inside a QAT graph back into ``model`` (same state keys)."""
    import torch

    sd = graph.state_dict()
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k in sd and sd[k].shape == v.shape:
                v.copy_(sd[k])


def build_pt2e(
    model: nn.Module,
    qparams: dict[str, dict[str, Any]],
    reduce_range: bool,
    exclude: Iterable[str],
    input_shape: Iterable[int],
) -> Any:
    """The converted int8 graph for ``model`` (weights already on the grid) with the recorded
    qparams: export, prepare, pin every observer's qparams, ``convert_pt2e``. No calibration."""
    import torch

    api = _pt2e()
    gm = export_graph(model, torch.zeros(2, *input_shape))
    with quiet():
        pm = api.prepare(gm, x86_quantizer(reduce_range, False, exclude))
    _pin_qparams(pm, qparams)
    with quiet():
        return api.convert(pm)


class FrozenCompiled:
    """``torch.compile(model, dynamic=False)`` whose compilations run with inductor's ``freezing``
    (weights become constants, so int8 weights are pre-packed for oneDNN). The flag is switched on
    only around the first call at each input shape (when dynamo compiles), not for the process.

    (``torch.compile(options={"freezing": True})`` is not equivalent in torch 2.14: the quantized
    conv lowering then fails with "UnsupportedOperatorException: onednn.qconv_prepack".)"""

    def __init__(self, model: Any):
        self.model = model
        self.compiled = torch.compile(model, dynamic=False)
        self.seen: set[tuple[Any, ...]] = set()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.shape, x.dtype, torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        if key in self.seen:
            return self.compiled(x)
        import torch._inductor.config as ic

        with ic.patch(freezing=True), quiet():
            out = self.compiled(x)
        self.seen.add(key)
        return out


def compile_frozen(model: Any) -> FrozenCompiled:
    return FrozenCompiled(model)


def _pin_qparams(pm: Any, qparams: dict[str, dict[str, Any]]) -> None:
    """Make every observer of a prepared graph report the recorded scale / zero point."""
    obs = _observer_nodes(pm)
    have, want = {k for k, _, _ in obs}, set(qparams)
    if have != want:
        missing, extra = sorted(want - have)[:3], sorted(have - want)[:3]
        raise SourceError(
            "the quantized graph of this model differs from the recorded one (torch/torchao version change?): "
            f"recorded but absent {missing}, present but not recorded {extra}"
        )
    for key, _, mod in obs:
        p = qparams[key]
        scale = torch.from_numpy(unpack_array(p["scale"]))
        zp = torch.from_numpy(unpack_array(p["zero_point"]))
        mod.calculate_qparams = functools.partial(_fixed_qparams, scale, zp)
        if hasattr(mod, "min_val"):  # convert warns on observers that never saw data; they need none
            mod.min_val = torch.tensor(0.0) if mod.min_val.dim() == 0 else torch.zeros_like(scale)
            mod.max_val = torch.tensor(1.0) if mod.max_val.dim() == 0 else torch.ones_like(scale)


def _fixed_qparams(scale: torch.Tensor, zp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return scale, zp


class QuantizedGraph(nn.Module):
    """An int8 graph from torchao's PT2E flow. ``compiled``: run through ``torch.compile``
    (inductor, freezing on, one compilation per batch size: inductor's dynamic-shape path
    mis-strides quantized convolutions in torch 2.14), else the converted graph in eager
    (2-3x slower than fp32: only for debugging). Inference only (``train()`` changes nothing)."""

    def __init__(self, graph: Any, compiled: bool = True):
        super().__init__()
        self.graph = graph
        self.compiled = compiled
        self.__dict__["_fn"] = None
        self.__dict__["_ready"] = {}  # (shape, dtype, inference mode) -> compiled callable

    def train(self, mode: bool = True) -> QuantizedGraph:  # exported graphs refuse train()/eval()
        self.training = mode
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # no module hooks: ~5% at batch 1
        return self.forward(x)

    def _callable(self) -> Any:
        if self.__dict__.get("_fn") is None:
            if self.compiled:
                import torch._dynamo.config as dc

                dc.recompile_limit = max(dc.recompile_limit, 64)
                self.__dict__["_fn"] = compile_frozen(self.graph)
            else:
                self.__dict__["_fn"] = self.graph
        return self.__dict__["_fn"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # fast path: a batch shape already compiled
            fn = self.__dict__["_ready"].get((x.shape, x.dtype, torch.is_inference_mode_enabled()))
            if fn is not None:
                return fn(x)
        fn = self.__dict__.get("_fn") or self._callable()
        with torch.no_grad():
            out = fn(x)
            if self.compiled:
                self.__dict__["_ready"][(x.shape, x.dtype, torch.is_inference_mode_enabled())] = fn.compiled
            return out

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fn"] = None
        state["_ready"] = {}
        return state


# --------------------------------------------------------------------------- FX (torch.ao, deprecated)
def fx_available() -> bool:
    try:
        from torch.ao.quantization import quantize_fx  # noqa: F401
    except ImportError:
        return False
    return True


def fx_qconfig_mapping(reduce_range: bool, exclude: Iterable[str] = ()) -> Any:
    """torch.ao's x86 mapping with activations' reduce_range from the CPU and per-channel weights
    on the symmetric -127..127 range (re-observing weights already on that grid gives them back)."""
    from torch.ao.quantization import (
        HistogramObserver,
        QConfig,
        get_default_qconfig_mapping,
        per_channel_weight_observer_range_neg_127_to_127,
    )

    qc = QConfig(
        activation=HistogramObserver.with_args(reduce_range=reduce_range),
        weight=per_channel_weight_observer_range_neg_127_to_127,
    )
    mapping = get_default_qconfig_mapping("x86").set_global(qc)
    for name in exclude:
        mapping.set_module_name(name, None)
    return mapping


def _fx_prepare(
    model: nn.Module, input_shape: Iterable[int], reduce_range: bool, exclude: Iterable[str]
) -> Any:
    from torch.ao.quantization.quantize_fx import prepare_fx

    try:
        with quiet():
            return prepare_fx(
                copy.deepcopy(model).eval(),
                fx_qconfig_mapping(reduce_range, exclude),
                (torch.zeros(2, *input_shape),),
            )
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise StageError(f"torch.ao FX cannot trace the model ({type(e).__name__}: {first})") from None


def fx_calibrate(
    model: nn.Module, batches: list[torch.Tensor], reduce_range: bool, exclude: Iterable[str] = ()
) -> dict[str, dict[str, Any]]:
    """torch.ao FX: ``prepare_fx`` (x86 mapping), run the calibration batches; -> activation qparams."""
    pm = _fx_prepare(model, batches[0].shape[1:], reduce_range, exclude)
    with torch.no_grad(), quiet():
        for x in batches:
            pm(x)
    return record_qparams(pm)


def snap_fx_weights_(model: nn.Module, exclude: Iterable[str] = ()) -> int:
    """Snap every Conv/Linear weight to its per-channel -127..127 grid (what convert_fx will use)."""
    from torch.ao.quantization import per_channel_weight_observer_range_neg_127_to_127

    skip = set(exclude)
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and name not in skip:
            obs = per_channel_weight_observer_range_neg_127_to_127()
            obs(m.weight.detach())
            scale, zp = obs.calculate_qparams()
            snap_(m.weight, scale, zp, obs.ch_axis, obs.quant_min, obs.quant_max)
            n += 1
    return n


def build_fx(
    model: nn.Module,
    qparams: dict[str, dict[str, Any]],
    reduce_range: bool,
    exclude: Iterable[str],
    input_shape: Iterable[int],
) -> nn.Module:
    """torch.ao FX ``convert_fx`` of ``model`` (weights on the grid) with the recorded activation
    qparams pinned: an eager module of quantized kernels (x86 backend)."""
    from torch.ao.quantization.quantize_fx import convert_fx

    pm = _fx_prepare(model, input_shape, reduce_range, exclude)
    _pin_qparams(pm, qparams)
    with quiet():
        return convert_fx(pm)


# --------------------------------------------------------------------------- dynamic int8 (torch.ao)
def dynamic_qconfig_spec(exclude: Iterable[str] = ()) -> dict[Any, Any]:
    """Linear: per-channel int8 weights; LSTM: per-tensor. Weight range -127..127 (symmetric), so
    re-quantizing weights already on the grid gives back the same integers (exact reload)."""
    from torch import nn
    from torch.ao.quantization import (
        QConfig,
        default_dynamic_quant_observer,
        per_channel_weight_observer_range_neg_127_to_127,
        weight_observer_range_neg_127_to_127,
    )

    spec: dict[Any, Any] = {
        nn.Linear: QConfig(
            activation=default_dynamic_quant_observer, weight=per_channel_weight_observer_range_neg_127_to_127
        ),
        nn.LSTM: QConfig(
            activation=default_dynamic_quant_observer, weight=weight_observer_range_neg_127_to_127
        ),
    }
    for name in exclude:
        spec[name] = None
    return spec


def dynamic_quantize(model: nn.Module, exclude: Iterable[str] = ()) -> nn.Module:
    """``torch.ao.quantization.quantize_dynamic`` on a copy (CPU): int8 weights, activations
    quantized at run time."""
    import torch
    from torch.ao.quantization import quantize_dynamic

    with quiet():
        return quantize_dynamic(
            copy.deepcopy(model).cpu().eval(), dynamic_qconfig_spec(exclude), dtype=torch.qint8
        )


def dequantize32(qt: torch.Tensor) -> torch.Tensor:
    """A quantized tensor's values as float32 ``(q - zero_point) * float32(scale)``, no -0.0 (the
    checkpoint then finds each row's int8 grid and stores it at 8 bits per value)."""
    if qt.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        shape = [1] * qt.dim()
        shape[qt.q_per_channel_axis()] = -1
        s = qt.q_per_channel_scales().float().reshape(shape)
        z = qt.q_per_channel_zero_points().float().reshape(shape)
    else:
        s = torch.tensor(qt.q_scale(), dtype=torch.float32)
        z = torch.tensor(float(qt.q_zero_point()))
    return (qt.int_repr().float() - z) * s + 0.0


def snap_dynamic_weights_(model: nn.Module, qmodel: nn.Module) -> list[str]:
    """Write the int8 weights of ``qmodel`` (as float32 values) into ``model``; -> the layer names."""
    from torch.ao.nn.quantized import dynamic as nnqd

    from compress_cli._utils.modules import tensor_attr

    done = []
    with torch.no_grad():
        for name, qm in qmodel.named_modules():
            if isinstance(qm, nnqd.Linear):
                tensor_attr(model.get_submodule(name)).copy_(dequantize32(qm.weight()))
                done.append(name)
            elif isinstance(qm, nnqd.LSTM):
                target = model.get_submodule(name)
                for wname, w in qm._weight_bias()["weight"].items():
                    getattr(target, wname).copy_(dequantize32(w))
                done.append(name)
    return done


# --------------------------------------------------------------------------- ONNX Runtime
#: the exporters an ``exporter`` setting tries, in order (auto: the fast one, then the one that takes more ops)
ONNX_EXPORTERS = {"auto": ("legacy", "dynamo"), "torchscript": ("legacy",), "dynamo": ("dynamo",)}


def export_onnx(
    model: nn.Module, input_shape: Iterable[int], opset: int = 17, exporter: str = "auto"
) -> tuple[bytes, str]:
    """fp32 ONNX of ``model`` (in eval mode) with a dynamic batch axis -> (bytes, "torchscript" or "dynamo").

    ``model`` is left as it was. It is copied only when it is not all-CPU fp32 already: the copy is
    the model's size again, which a 500M-parameter model (ViT-H/14) cannot spare next to the exporter."""
    import torch

    from compress_cli.runtime.export import onnx_bytes

    tensors = [*model.parameters(), *model.buffers()]
    ready = all(
        t.device.type == "cpu" and t.dtype in (torch.float32, torch.int64, torch.bool) for t in tensors
    )
    modes = {name: m.training for name, m in model.named_modules()}
    work = model if ready else copy.deepcopy(model).cpu().float()
    try:
        data, used = onnx_bytes(
            work.eval(), torch.zeros(2, *input_shape), opset=opset, exporters=ONNX_EXPORTERS[exporter]
        )
    finally:
        for name, m in model.named_modules():
            m.training = modes[name]
    return data, "torchscript" if used == "legacy" else used


def export_onnx_file(
    model: nn.Module, input_shape: Iterable[int], path: Path, opset: int = 17, exporter: str = "auto"
) -> str:
    """:func:`export_onnx` written to ``path``; returns the exporter used. For the ONNX Runtime
    quantizer, which reads a file: the bytes are not held in memory while it runs (they are the
    model's size again)."""
    data, used = export_onnx(model, input_shape, opset, exporter)
    Path(path).write_bytes(data)
    return used


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
    import numpy as np
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
    import numpy as np
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


def ort_rebuild(
    fp32: bytes | Path,
    params: dict[str, Any],
    reduce_range: bool,
    input_shape: Iterable[int],
    exclude_nodes: Iterable[str] = (),
) -> bytes:
    """The QDQ int8 model for ``fp32`` (weights already on the grid) with the recorded scales:
    ``quantize_static`` on one dummy batch gives the graph; every scale / zero point is then
    replaced by the recorded one and every quantized initializer recomputed from the fp32 weights."""
    import numpy as np
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
            f"recorded but absent {sorted(set(params) - qparam_names)[:3]}, new {sorted(qparam_names - set(params))[:3]}"
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


class OrtModule(nn.Module):
    """An ONNX Runtime CPU session as an ``nn.Module``: ``forward(x: Tensor) -> Tensor``.

    ``onnx_bytes`` is the model file (``save(path)`` writes it); ``threads`` sets intra-op threads
    (None: ONNX Runtime's default). Inference only: no parameters, no gradients."""

    def __init__(self, onnx_bytes: bytes, threads: int | None = None):
        super().__init__()
        self.onnx_bytes = onnx_bytes
        self.threads = threads
        self.__dict__["_session"] = None

    @property
    def session(self) -> Any:
        if self.__dict__.get("_session") is None:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.log_severity_level = 3
            if self.threads:
                so.intra_op_num_threads = int(self.threads)
                so.inter_op_num_threads = 1
            self.__dict__["_session"] = ort.InferenceSession(
                self.onnx_bytes, so, providers=["CPUExecutionProvider"]
            )
        return self.__dict__["_session"]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # no module hooks: ~8% at batch 1
        return self.forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        session = self.__dict__.get("_session") or self.session
        if x.requires_grad or x.device.type != "cpu" or x.dtype != torch.float32:
            x = x.detach().cpu().float()
        return torch.from_numpy(session.run(None, {ONNX_INPUT: x.contiguous().numpy()})[0])

    def save(self, path: str | Path) -> Path:
        from compress_cli._utils.io import atomic_write_bytes

        p = Path(path)
        atomic_write_bytes(p, self.onnx_bytes)
        return p

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_session"] = None
        return state


def calibration_arrays(batches: list[torch.Tensor]) -> list[Any]:
    return [b.detach().cpu().float().numpy() for b in batches]


# --------------------------------------------------------------------------- torchao weight-only (CUDA)
def weight_only(model: nn.Module, bits: int, group_size: int, device: Any) -> nn.Module:
    """torchao ``quantize_`` with Int8WeightOnlyConfig / Int4WeightOnlyConfig on a CUDA copy."""
    import torch

    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise StageError(f"int{bits}_weight_only needs torchao: pip install torchao") from None
    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        raise StageError(
            f"int{bits}_weight_only needs a CUDA device (torchao's weight-only kernels are CUDA kernels)"
        )
    m = copy.deepcopy(model).to(device).eval()
    with quiet():
        if bits == 8:
            quantize_(m, Int8WeightOnlyConfig())
        else:
            m = m.to(torch.bfloat16)
            quantize_(m, Int4WeightOnlyConfig(group_size=group_size))
            cast_(m, torch.bfloat16, convert=False)
    return m


# --------------------------------------------------------------------------- casts
def _cast_input(dtype: Any, module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(
        a.to(dtype) if hasattr(a, "is_floating_point") and a.is_floating_point() else a for a in args
    )


def _cast_output(module: Any, args: Any, output: Any) -> Any:
    return output.float() if hasattr(output, "is_floating_point") and output.is_floating_point() else output


def cast_(model: nn.Module, dtype: Any, convert: bool = True) -> nn.Module:
    """Cast ``model`` to ``dtype`` in place; hooks cast floating inputs to it and outputs back to
    fp32, so callers keep feeding fp32 batches and reading fp32 logits."""
    if convert:
        model.to(dtype)
    for h in model.__dict__.pop("_compress_cast_hooks", []):
        h.remove()
    model.__dict__["_compress_cast_hooks"] = [
        model.register_forward_pre_hook(functools.partial(_cast_input, dtype)),
        model.register_forward_hook(_cast_output),
    ]
    return model


# --------------------------------------------------------------------------- the one rebuild
def rebuild(model: nn.Module, entry: dict[str, Any], device: Any = None) -> nn.Module:
    """The runtime module for a snapped model and its ``transforms`` entry (stage and load())."""
    import torch

    scheme = entry["scheme"]
    if scheme in CAST_SCHEMES:
        return cast_(model, torch.float16 if scheme == "fp16" else torch.bfloat16)
    if scheme == "int8_dynamic":
        return dynamic_quantize(model, entry.get("exclude", []))
    if scheme == "int8_static" and entry.get("backend") == "fx":
        return build_fx(
            model.cpu(),
            entry["qparams"],
            entry["reduce_range"],
            entry.get("exclude", []),
            entry["input_shape"],
        )
    if scheme in ("int8_static", "qat"):
        graph = build_pt2e(
            model.cpu(),
            entry["qparams"],
            entry["reduce_range"],
            entry.get("exclude", []),
            entry["input_shape"],
        )
        return QuantizedGraph(graph, compiled=entry.get("compile", True))
    if scheme == "onnxruntime_int8":
        with tempfile.TemporaryDirectory(prefix="compress-onnx-") as d:
            fp32 = Path(d) / "fp32.onnx"
            export_onnx_file(
                model,
                entry["input_shape"],
                fp32,
                entry.get("opset", 17),
                entry.get("exporter", "torchscript"),
            )
            q = ort_rebuild(
                fp32,
                entry["onnx_qparams"],
                entry["reduce_range"],
                entry["input_shape"],
                entry.get("exclude_nodes", []),
            )
        return OrtModule(q)
    if scheme in CUDA_SCHEMES:
        if device is None:
            if not torch.cuda.is_available():
                raise SourceError(
                    f"this model was quantized with {scheme}, which needs a CUDA device to load"
                )
            device = torch.device("cuda")
        return weight_only(
            model, 8 if scheme == "int8_weight_only" else 4, entry.get("group_size", 128), device
        )
    raise SourceError(f"unknown quantization scheme {scheme!r} in the manifest")
