"""fp16 / bf16: the module cast to that dtype; hooks cast inputs to it and logits back to fp32."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compress_cli.quantization.base import Quantized, SchemeHandler
from compress_cli.quantization.schemes import register_scheme

if TYPE_CHECKING:
    from compress_cli.state import State

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _cast_input(dtype: Any, module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(
        a.to(dtype) if hasattr(a, "is_floating_point") and a.is_floating_point() else a for a in args
    )


def _cast_output(module: Any, args: Any, output: Any) -> Any:
    return output.float() if hasattr(output, "is_floating_point") and output.is_floating_point() else output


def cast_(model: nn.Module, dtype: Any, convert: bool = True) -> nn.Module:
    """Cast ``model`` to ``dtype`` in place; hooks cast floating inputs to it and outputs back to
    fp32, so callers keep feeding fp32 batches and reading fp32 logits. ``convert=False``: only
    the hooks (a module already in that dtype)."""
    if convert:
        model.to(dtype)
    for h in model.__dict__.pop("_compress_cast_hooks", []):
        h.remove()
    model.__dict__["_compress_cast_hooks"] = [
        model.register_forward_pre_hook(functools.partial(_cast_input, dtype)),
        model.register_forward_hook(_cast_output),
    ]
    return model


@register_scheme("fp16")
@register_scheme("bf16")
class Cast(SchemeHandler):
    """The state's model itself is cast (and stored in that dtype); it runs in torch eager."""

    def build_runtime(self, model: nn.Module, entry: dict[str, Any], device: Any = None) -> nn.Module:
        """The stored module itself, cast in place (hooks keep fp32 in and out)."""
        return cast_(model, DTYPES[entry["scheme"]])

    def convert(self, state: State, options: Any, label: str) -> Quantized:
        """Cast ``state.model``; the notes warn where fp16 on CPU is slow."""
        done = super().convert(state, options, label)
        done.notes = (
            f"weights and activations cast to {options.scheme}; inputs cast on entry, logits returned as fp32"
        )
        if options.scheme == "fp16" and state.device.type == "cpu":
            done.notes += (
                "; fp16 on CPU is fast only with AVX512-FP16/AMX-FP16 and may be slower than fp32 or fail "
                "for some convolutions elsewhere (bf16 is the CPU half-precision choice)"
            )
        return done
