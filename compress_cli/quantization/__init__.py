"""Quantization, all of it: the scheme table, the handler of each scheme, one module per backend.

================  ====================  ==========================================================
scheme            module                what runs (the stage's runner, and what ``load()`` returns)
================  ====================  ==========================================================
int8_dynamic      dynamic.py            eager module with ``torch.ao`` dynamic int8 Linear/LSTM (CPU)
int8_static, qat  pt2e.py               :class:`~compress_cli.quantization.pt2e.QuantizedGraph`: torchao
                                        PT2E int8 graph through ``torch.compile`` (or eager with
                                        ``compile: false``)
int8_static (fx)  fx.py                 torch.ao FX ``convert_fx`` module (eager), ``backend: fx``
onnxruntime_int8  onnxruntime.py        :class:`~compress_cli.runtime.ort.OrtModule` over the QDQ graph
openvino_int8     openvino.py           :class:`~compress_cli.runtime.openvino.OvModule` over NNCF's int8
                                        OpenVINO model (``openvino_fp32``: the converted fp32 model)
onnxruntime_fp32  onnxruntime.py        :class:`~compress_cli.runtime.ort.OrtModule` over the fp32 export
int8/int4_weight  weight_only.py        torchao weight-only quantized Linear weights (CUDA only)
fp16, bf16        cast.py               the module in that dtype, fp32 in and out
================  ====================  ==========================================================

Shared pieces: ``schemes.py`` (the torch-free table: devices, options, export formats),
``base.py`` (the handler protocol and the SQNR-gated int8 conversion), ``auto.py`` (``scheme: auto``:
every candidate measured, the fastest within the budget kept), ``qparams.py`` (record and
pin observer qparams), ``fold.py`` (batch-norm folding), ``cpu.py`` (``reduce_range`` from the CPU
flags), ``transforms.py`` (the load transform). ``torch.ao.quantization`` is deprecated upstream and
PT2E moved to torchao: every call into them is in this package.

Add a scheme: a :class:`Scheme` plus a :class:`SchemeHandler` subclass registered with
:func:`register_scheme` (see CONTRIBUTING.md). This module is torch-free at import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from compress_cli.quantization.base import Int8Handler, Int8Job, Quantized, SchemeHandler
from compress_cli.quantization.schemes import SCHEMES, Scheme, get_scheme, handler, register_scheme

if TYPE_CHECKING:
    from compress_cli.state import State

__all__ = [
    "SCHEMES",
    "Int8Handler",
    "Int8Job",
    "Quantized",
    "Scheme",
    "SchemeHandler",
    "get_scheme",
    "handler",
    "quantize",
    "register_scheme",
]


def quantize(state: State, options: Any, label: str = "quantize") -> Quantized:
    """Apply ``options.scheme`` to ``state.model``, seeded by ``state.seed`` (the same result for the
    same seed; the caller's RNG streams are left as they were). ``options``: the ``quantize`` stage's
    config; ``label`` names the stage in the edit log. With ``max_accuracy_drop`` set: the accuracy
    budget with per-layer fallback of :mod:`compress_cli.quantization.budget`."""
    import torch

    if getattr(options, "max_accuracy_drop", None) is not None:
        from compress_cli.quantization.budget import convert_within_budget

        return convert_within_budget(handler(options.scheme), state, options, label)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(state.seed)
        return handler(options.scheme).convert(state, options, label)
