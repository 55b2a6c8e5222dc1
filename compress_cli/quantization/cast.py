"""fp16 / bf16: the module cast to that dtype; hooks cast floating inputs (positional or keyword)
to it and every floating output tensor back to fp32 (token ids and masks stay as they are)."""

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


def _cast_input(
    dtype: Any, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    from compress_cli._utils.batches import map_tensors

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    return map_tensors(args, cast), map_tensors(kwargs, cast)


def _cast_output(module: Any, args: Any, output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.float() if output.is_floating_point() else output
    from collections.abc import MutableMapping

    from compress_cli._utils.batches import map_tensors

    def back(t: torch.Tensor) -> torch.Tensor:
        return t.float() if t.is_floating_point() else t

    if isinstance(output, MutableMapping):  # in place: a ModelOutput keeps its class and attributes
        for k in list(output.keys()):
            output[k] = map_tensors(output[k], back)
        return output
    return map_tensors(output, back)


def cast_(model: nn.Module, dtype: Any, convert: bool = True) -> nn.Module:
    """Cast ``model`` to ``dtype`` in place; hooks cast floating inputs to it and outputs back to
    fp32, so callers keep feeding fp32 batches and reading fp32 logits. ``convert=False``: only
    the hooks (a module already in that dtype)."""
    if convert:
        model.to(dtype)
    for h in model.__dict__.pop("_compress_cast_hooks", []):
        h.remove()
    model.__dict__["_compress_cast_hooks"] = [
        model.register_forward_pre_hook(functools.partial(_cast_input, dtype), with_kwargs=True),
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
            f"weights and activations cast to {options.scheme}; floating inputs cast on entry, "
            "outputs returned as fp32"
        )
        if options.scheme == "fp16" and state.device.type == "cpu":
            done.notes += (
                "; fp16 on CPU is fast only with AVX512-FP16/AMX-FP16 and may be slower than fp32 or fail "
                "for some convolutions elsewhere (bf16 is the CPU half-precision choice)"
            )
        return done
