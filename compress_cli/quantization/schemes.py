"""THE table of quantization schemes, torch-free: what ``compress validate`` knows about each scheme.

A :class:`Scheme` says where the scheme runs, whether the model is frozen after it (a converted
inference model: nothing may train or change it afterwards), which options of the ``quantize``
stage apply to it, and which export formats its model has. The stage's validation, the recipe's
cross-stage rules and the ``export`` stage all read this table; nothing else lists schemes.

The code that applies a scheme is a handler (see :mod:`compress_cli.quantization.base`) bound to
the scheme by :func:`register_scheme`. Built-in handlers live in one module per backend, named
by ``Scheme.module`` and imported only when a scheme is applied or loaded: validation stays
torch-free.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TypeVar

from compress_cli.errors import SourceError

if TYPE_CHECKING:
    from compress_cli.quantization.base import SchemeHandler

#: every export format of the ``export`` stage
FORMATS = ("onnx", "torch_export", "torchscript", "openvino")
_PT2E_FORMATS = (
    ("torch_export",),
    "the PT2E int8 graph is a torch.export program: ONNX has no mapping for its "
    "quantized_decomposed ops and TorchScript cannot trace it (for ONNX use scheme onnxruntime_int8)",
)
_WEIGHT_ONLY_FORMATS: tuple[tuple[str, ...], str] = (
    (),
    "torchao's weight-only tensor subclasses are not exported by this stage yet; "
    "the checkpoint reloads with compress_cli.load() on CUDA",
)
#: why a scheme that runs on one kind of device cannot run on another (recipe and run time)
_WHY_CUDA = (
    "runs on CUDA only: torchao's weight-only kernels are CUDA kernels; on CPU its int8 configs ran "
    "0.2-0.7x (slower than fp32), Conv2d layers are not supported, and int4 needs CUDA (tinygemm) kernels. "
    "On CPU use int8_static, onnxruntime_int8 or int8_dynamic"
)
_INT8 = frozenset({"min_sqnr_db", "exclude"})  # every CPU int8 scheme is SQNR-gated and can skip layers
#: the accuracy budget with per-layer fallback (quantization/budget.py): the post-training int8
#: schemes (qat would retrain for every step)
_BUDGET = frozenset({"max_accuracy_drop", "max_float_layers", "budget_batches"})


@dataclass(frozen=True)
class Scheme:
    """One quantization scheme, as validation sees it.

    ``device``: ``cpu`` (a CPU int8 model, measured on CPU), ``cuda`` (CUDA kernels only) or ``any``.
    ``layers``: the ``torch.nn`` layer classes it converts (what ``compress validate --model`` lists).
    ``options``: the ``quantize`` stage options that apply (setting another one is a recipe error);
    ``trains``: the training options (epochs, lr, ...) apply too. ``formats`` / ``formats_why``: the
    export formats its model has and why the others cannot take it; ``backend_formats`` overrides
    them per ``backend`` option. ``module``: the module whose import registers the handler (None
    for a scheme registered together with its handler)."""

    name: str
    device: Literal["cpu", "cuda", "any"]
    freezes: bool
    options: frozenset[str] = frozenset()
    trains: bool = False
    layers: tuple[str, ...] = ("Linear", "Conv1d", "Conv2d", "Conv3d")
    formats: tuple[str, ...] = FORMATS
    formats_why: str = ""
    backend_formats: Mapping[str, tuple[tuple[str, ...], str]] = field(default_factory=dict)
    module: str | None = None

    def device_problem(self, device: str, at_run: bool = False) -> str | None:
        """Why this scheme cannot run on ``device``, or None. At validation ``device`` is the recipe's
        (``auto`` is decided at run time); ``at_run``: the torch device the stage runs on."""
        kind = device.partition(":")[0]
        if at_run:
            wrong = self.device != "any" and kind != self.device
        else:
            wrong = kind in {"cuda": ("cpu", "mps"), "cpu": ("cuda", "mps")}.get(self.device, ())
        where = f"(running on {device})" if at_run else f"(recipe device: {device})"
        if not wrong:
            return None
        if self.device == "cuda":
            return f"scheme {self.name} {_WHY_CUDA} {where}"
        if at_run:
            return f"scheme {self.name} makes a CPU int8 model; run with --device cpu {where}"
        return (
            f"scheme {self.name} makes a CPU int8 model (x86/ONNX Runtime CPU kernels) and is measured "
            f"on CPU; set device: cpu {where}, or use int8_weight_only on CUDA"
        )


def _builtin(name: str, device: Literal["cpu", "cuda", "any"], module: str, **kw: object) -> Scheme:
    return Scheme(name, device, module=f"compress_cli.quantization.{module}", **kw)  # type: ignore[arg-type]


#: name -> scheme, in the order users see them; :func:`register_scheme` adds plugin schemes
SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        _builtin(
            "int8_dynamic",
            "cpu",
            "dynamic",
            freezes=True,
            options=_INT8 | _BUDGET | {"reduce_range"},
            layers=("Linear", "LSTM", "Embedding"),
            formats=("torchscript",),
            formats_why="torch.ao's dynamic int8 ops (quantized::linear_dynamic) have no ONNX "
            "mapping and their packed weights do not pass torch.export",
        ),
        _builtin(
            "int8_static",
            "cpu",
            "pt2e",
            freezes=True,
            options=_INT8 | _BUDGET | {"calibration_batches", "reduce_range", "compile", "backend"},
            formats=_PT2E_FORMATS[0],
            formats_why=_PT2E_FORMATS[1],
            backend_formats={
                "fx": (("torchscript",), "the torch.ao FX int8 model exports to TorchScript only")
            },
        ),
        _builtin(
            "qat",
            "cpu",
            "pt2e",
            freezes=True,
            trains=True,
            options=_INT8 | {"reduce_range", "compile"},
            formats=_PT2E_FORMATS[0],
            formats_why=_PT2E_FORMATS[1],
        ),
        _builtin(
            "onnxruntime_int8",
            "cpu",
            "onnxruntime",
            freezes=True,
            options=_INT8
            | _BUDGET
            | {
                "calibration_batches",
                "reduce_range",
                "calibrate_method",
                "opset",
                "exporter",
                "op_types_to_quantize",
                "mode",
            },
            formats=("onnx",),
            formats_why="the model is an ONNX Runtime int8 graph (QDQ): it exists only as ONNX",
        ),
        _builtin(
            "openvino_int8",
            "cpu",
            "openvino",
            freezes=True,
            options=_INT8 | _BUDGET | {"calibration_batches", "inference_precision"},
            formats=("openvino",),
            formats_why="the model is an OpenVINO int8 graph (NNCF FakeQuantize): it exists only as "
            "OpenVINO IR (.xml/.bin)",
        ),
        _builtin(
            "openvino_fp32",
            "cpu",
            "openvino",
            freezes=True,
            options=frozenset({"inference_precision"}),
            formats=("openvino",),
            formats_why="the model runs as OpenVINO IR: export it as openvino",
        ),
        _builtin(
            "onnxruntime_fp32",
            "cpu",
            "onnxruntime",
            freezes=True,
            formats=("onnx",),
            formats_why="the model runs as an fp32 ONNX graph in ONNX Runtime: export it as onnx",
        ),
        _builtin(
            "int8_weight_only",
            "cuda",
            "weight_only",
            freezes=True,
            formats=_WEIGHT_ONLY_FORMATS[0],
            formats_why=_WEIGHT_ONLY_FORMATS[1],
        ),
        _builtin(
            "int4_weight_only",
            "cuda",
            "weight_only",
            freezes=True,
            options=frozenset({"group_size"}),
            formats=_WEIGHT_ONLY_FORMATS[0],
            formats_why=_WEIGHT_ONLY_FORMATS[1],
        ),
        _builtin("fp16", "any", "cast", freezes=False),
        _builtin("bf16", "any", "cast", freezes=False),
    )
}
_HANDLERS: dict[str, SchemeHandler] = {}

H = TypeVar("H", bound="type[SchemeHandler]")


def register_scheme(scheme: Scheme | str) -> Callable[[H], H]:
    """Class decorator: ``cls()`` applies ``scheme`` (torchao's ``register_quantize_module_handler``).

    Give a :class:`Scheme` to add a new scheme to the table, or the name of one already in it (the
    built-in handlers do this). One class may be registered for several schemes."""
    if isinstance(scheme, Scheme):
        known = SCHEMES.get(scheme.name)
        if known is not None and known != scheme:
            raise ValueError(f"quantization scheme {scheme.name!r} is already registered differently")
        SCHEMES[scheme.name] = scheme
        name = scheme.name
    elif scheme in SCHEMES:
        name = scheme
    else:
        raise ValueError(f"quantization scheme {scheme!r} is not in the table: register a Scheme for it")

    def deco(cls: H) -> H:
        _HANDLERS[name] = cls()
        return cls

    return deco


def get_scheme(name: str) -> Scheme:
    """The scheme called ``name``; SourceError (e.g. a manifest written by a newer version) if none."""
    try:
        return SCHEMES[name]
    except KeyError:
        raise SourceError(f"unknown quantization scheme {name!r} in the manifest") from None


def handler(name: str) -> SchemeHandler:
    """The handler that applies scheme ``name``. Imports its backend module the first time; a name
    not in the table loads the plugins first (a checkpoint written with a third-party scheme)."""
    if name not in SCHEMES:
        from compress_cli._utils.plugins import load_plugins

        try:
            load_plugins()
        except ImportError as e:
            raise SourceError(f"quantization scheme {name!r}: {e}") from None
    scheme = get_scheme(name)
    if name not in _HANDLERS and scheme.module is not None:
        import importlib

        importlib.import_module(scheme.module)
    try:
        return _HANDLERS[name]
    except KeyError:
        raise SourceError(f"quantization scheme {name!r} has no registered handler") from None


def applies_to(option: str, training_options: frozenset[str]) -> list[str]:
    """The schemes a ``quantize`` option applies to, in table order (``training_options``: the
    option names that apply to every scheme that ``trains``)."""
    return [
        s.name for s in SCHEMES.values() if option in s.options or (s.trains and option in training_options)
    ]


def unsupported_formats(formats: list[str], scheme: str | None, backend: str | None = None) -> list[str]:
    """One message per export format the model quantized with ``scheme`` cannot be exported to."""
    s = SCHEMES.get(scheme) if scheme is not None else None
    if s is None:
        return []
    ok, why = s.backend_formats.get(backend or "", (s.formats, s.formats_why))
    return [
        f"format {f} is not available after quantize scheme {scheme}: {why}" for f in formats if f not in ok
    ]
