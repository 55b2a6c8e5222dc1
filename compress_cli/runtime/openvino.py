"""OpenVINO as a module: what ``openvino_int8`` / ``openvino_fp32`` models run in, the same-runtime
baseline, and the ``export`` stage's ``openvino`` format (``.xml`` + ``.bin``).

:func:`ov_convert` turns a PyTorch module into an ``openvino.Model`` (``openvino.convert_model``
with a real example of the model's inputs: a tensor, tuple or dict; see
:mod:`compress_cli.runtime.inputs`); :class:`OvModule` runs one on the CPU plugin, called like the
model it came from and returning what it returns (a tensor, or a dict / tuple of tensors).

Signals: each ``openvino.Core`` installs its own alternate signal stack on the thread that first
compiles with it and, when destroyed, puts back the one it found and unmaps its own; Cores
destroyed in another order than they were made (two candidates' models freed by the garbage
collector) leave the thread pointing at an unmapped stack, and the next signal delivered to a Python
handler there (installed with ``SA_ONSTACK``: the scheduler's SIGTERM the pipeline turns into a
graceful stop) kills the process with SIGSEGV (measured with openvino 2026.4: two Cores made, the
first destroyed first). So every model here compiles on one process-wide Core (:func:`core`),
and every call into OpenVINO or NNCF that may make or destroy a Core runs inside
:func:`signal_stack_kept`, which puts the thread's alternate signal stack back as it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compress_cli.errors import SourceError, StageError
from compress_cli.runtime.inputs import InputSpec

#: rt_info keys of a saved IR: the input spec and the output structure (what OvModule rebuilds)
RT_INPUTS, RT_OUTPUTS = "compress_inputs", "compress_outputs"
#: the pip extra that installs OpenVINO and NNCF
INSTALL = "pip install 'compress-cli[openvino]'"
#: the inference precisions an OpenVINO model may be compiled with (the quantize stage's
#: ``inference_precision``): f32, or bf16 on CPUs with bf16 units
PRECISIONS = ("f32", "bf16")


def require_openvino(what: str = "the openvino runtime") -> Any:
    """``import openvino``, or a located error saying how to install it."""
    try:
        import openvino as ov
    except ImportError:
        raise StageError(f"{what} needs OpenVINO, which is not installed: {INSTALL}") from None
    return ov


class _StackT(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@functools.cache
def _libc() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.sigaltstack.argtypes = [ctypes.POINTER(_StackT), ctypes.POINTER(_StackT)]
        return libc
    except (OSError, AttributeError):  # no sigaltstack here: nothing to keep
        return None


def signal_stack() -> tuple[int, int, int] | None:
    """This thread's alternate signal stack: (address, flags, size), or None where it cannot be read."""
    libc = _libc()
    if libc is None:
        return None
    st = _StackT()
    if libc.sigaltstack(None, ctypes.byref(st)) != 0:
        return None
    return (st.ss_sp or 0, st.ss_flags, st.ss_size)


@contextlib.contextmanager
def signal_stack_kept() -> Iterator[None]:
    """Run the body, then give this thread back the alternate signal stack it had before (see the
    module docstring: OpenVINO's Cores replace it and may leave it dangling)."""
    before = signal_stack()
    try:
        yield
    finally:
        after = signal_stack()
        if before is not None and after is not None and after != before:
            sp, flags, size = before
            st = _StackT(sp or None, flags, size)
            if flags & 2:  # SS_DISABLE: no alternate stack before
                st = _StackT(None, 2, 0)
            _libc().sigaltstack(ctypes.byref(st), None)


@functools.cache
def core() -> Any:
    """The process-wide ``openvino.Core`` every model here compiles and reads on (never destroyed
    before exit; see the module docstring)."""
    ov = require_openvino()
    with signal_stack_kept():
        return ov.Core()


def bf16_supported() -> bool:
    """Whether the CPU plugin can infer in bf16 here (``OPTIMIZATION_CAPABILITIES`` lists ``BF16``:
    AVX512_BF16 or AMX units); elsewhere OpenVINO compiles a bf16 hint as f32."""
    with signal_stack_kept():
        return "BF16" in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def compile_config(threads: int | None, precision: str = "f32") -> dict[str, Any]:
    """The CPU plugin configuration every model here is compiled with: ``PERFORMANCE_HINT:
    LATENCY``, ``INFERENCE_PRECISION_HINT`` = ``precision`` (stated, because on CPUs with bf16
    units OpenVINO's default is bf16 inference, which is neither the fp32 model nor what a
    quantized model's float parts were checked in unless chosen), ``INFERENCE_NUM_THREADS`` =
    ``threads`` when set."""
    if precision not in PRECISIONS:
        raise StageError(f"inference_precision {precision!r}: one of {', '.join(PRECISIONS)}")
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


def ov_convert(model: nn.Module, example: Any) -> tuple[Any, InputSpec, Any]:
    """``model`` (eval, CPU fp32) as an ``openvino.Model`` traced on ``example`` (the model's inputs)
    -> (ov model, input spec, output structure). The batch axis (and token inputs' sequence axis)
    are dynamic. ``model``'s train/eval modes come back as they were."""
    ov = require_openvino()
    from compress_cli._utils.quiet import quiet
    from compress_cli.runtime.export import output_layout

    spec = InputSpec.from_example(example, model)
    modes = {name: m.training for name, m in model.named_modules()}
    try:
        model.eval()
        layout = output_layout(model, spec, example)
        arg = spec.ordered(example)
        arg = tuple(arg) if isinstance(arg, list) else arg
        try:
            with torch.no_grad(), quiet(), signal_stack_kept():
                om = ov.convert_model(model, example_input=arg)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise StageError(f"OpenVINO conversion failed ({type(e).__name__}: {first[:300]})") from None
    finally:
        for name, m in model.named_modules():
            m.training = modes[name]
    if len(om.inputs) == len(spec.tensors):
        shapes = {
            i: ov.PartialShape([-1 if a in t.dynamic else d for a, d in enumerate((0, *t.shape))])
            for i, t in enumerate(spec.tensors)
        }
        with contextlib.suppress(Exception):  # else the converted shapes stay (dynamic where it could tell)
            om.reshape(shapes)
    structure = layout.structure if len(om.outputs) == len(layout.names) else None
    om.set_rt_info(json.dumps(spec.to_json()), RT_INPUTS)
    om.set_rt_info(json.dumps(structure), RT_OUTPUTS)
    return om, spec, structure


def _rebuild(structure: Any, leaves: list[torch.Tensor], names: list[str]) -> Any:
    """The model's output from the OV outputs (in the exporters' flattening order)."""
    by_name = dict(zip(names, leaves, strict=True))

    def walk(s: Any) -> Any:
        if isinstance(s, str):
            return by_name[s]
        if "dict" in s:
            return {k: walk(v) for k, v in s["dict"]}
        return tuple(walk(v) for v in s["list"])

    return walk(structure)


def _leaf_names(structure: Any) -> list[str]:
    if isinstance(structure, str):
        return [structure]
    if isinstance(structure, dict) and "dict" in structure:
        return [n for _, v in structure["dict"] for n in _leaf_names(v)]
    if isinstance(structure, dict) and "list" in structure:
        return [n for v in structure["list"] for n in _leaf_names(v)]
    return []


class OvModule(nn.Module):
    """An OpenVINO model compiled for the CPU plugin, as an ``nn.Module`` called like the model it
    was converted from: ``m(x)``, ``m(*xs)``, ``m(**named)`` or ``m(named_dict)``; returns a tensor,
    or the model's dict / tuple of tensors.

    ``ov_model`` is the ``openvino.Model`` (``save(path)`` writes ``.xml`` + ``.bin``); ``threads``
    sets ``INFERENCE_NUM_THREADS`` (None: OpenVINO's default) and ``precision`` the
    ``INFERENCE_PRECISION_HINT`` (f32 unless chosen; see :func:`compile_config`).
    Compiled on first use, not pickled. Inference only."""

    def __init__(self, ov_model: Any, threads: int | None = None, precision: str = "f32"):
        super().__init__()
        self.__dict__["ov_model"] = ov_model
        self.threads = threads
        self.precision = precision
        self.__dict__["_request"] = None
        spec = ov_model.get_rt_info(RT_INPUTS).astype(str) if ov_model.has_rt_info(RT_INPUTS) else None
        out = ov_model.get_rt_info(RT_OUTPUTS).astype(str) if ov_model.has_rt_info(RT_OUTPUTS) else "null"
        self.spec = InputSpec.from_json(json.loads(spec)) if spec else None
        self.structure = json.loads(out)

    @classmethod
    def from_file(cls, path: str | Path, threads: int | None = None, precision: str = "f32") -> OvModule:
        """Read an IR written by :meth:`save` (``model.xml`` next to its ``model.bin``)."""
        try:
            with signal_stack_kept():
                return cls(core().read_model(str(path)), threads, precision)
        except RuntimeError as e:
            raise SourceError(
                f"{path}: not a readable OpenVINO IR ({str(e).splitlines()[0][:200]})"
            ) from None

    def compile(self) -> Any:
        """The infer request over the compiled model (created once, outside any timed region)."""
        if self.__dict__.get("_request") is None:
            config = compile_config(self.threads, getattr(self, "precision", "f32"))
            with signal_stack_kept():
                compiled = core().compile_model(self.__dict__["ov_model"], "CPU", config)
            self.__dict__["_compiled"] = compiled
            self.__dict__["_request"] = compiled.create_infer_request()
        return self.__dict__["_request"]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # no module hooks
        return self.forward(*args, **kwargs)

    def _values(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
        if len(args) == 1 and not kwargs and isinstance(args[0], dict):
            kwargs, args = args[0], ()
        elif len(args) == 1 and not kwargs and isinstance(args[0], (tuple, list)):
            args = tuple(args[0])
        n = len(self.__dict__["ov_model"].inputs)
        if kwargs:
            names = self.spec.names if self.spec is not None else list(kwargs)
            missing = [k for k in names if k not in kwargs]
            if missing or args:
                raise StageError(
                    f"OpenVINO model inputs: {', '.join(names)}; got {', '.join(map(str, kwargs))}"
                )
            values = [kwargs[k] for k in names]
        else:
            values = list(args)
        if len(values) != n:
            raise StageError(f"the OpenVINO model takes {n} input(s), got {len(values)}")
        return values

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The compiled model's outputs for the inputs, in the model's output structure."""
        request = self.__dict__.get("_request") or self.compile()
        feeds = {}
        for i, v in enumerate(self._values(args, kwargs)):
            if isinstance(v, torch.Tensor):
                v = v.detach().cpu()
                v = (v.float() if v.is_floating_point() else v).contiguous().numpy()
            feeds[i] = np.asarray(v)
        request.infer(feeds)
        n = len(self.__dict__["ov_model"].outputs)
        outs = [torch.from_numpy(np.array(request.get_output_tensor(i).data)) for i in range(n)]
        if self.structure is None or isinstance(self.structure, str):
            return outs[0]
        return _rebuild(self.structure, outs, _leaf_names(self.structure))

    def save(self, path: str | Path) -> list[Path]:
        """Write ``path`` (``.xml``) and its ``.bin``; returns both paths."""
        ov = require_openvino()
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(self.__dict__["ov_model"], str(p), compress_to_fp16=False)
        return [p, p.with_suffix(".bin")]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_request"] = None
        state.pop("_compiled", None)
        return state


def ir_bytes(module: OvModule) -> int:
    """Bytes of ``module``'s IR on disk (``.xml`` + ``.bin``), the file one deploys."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="compress-ov-") as d:
        return sum(p.stat().st_size for p in module.save(Path(d) / "model.xml"))
