"""int8_weight_only / int4_weight_only: torchao's weight-only quantized Linear weights (CUDA only).

The checkpoint keeps the fp32 weights; load() quantizes them again with the same torchao config
(deterministic), on a CUDA device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compress_cli._utils.quiet import quiet
from compress_cli.errors import SourceError, StageError
from compress_cli.quantization.base import Quantized, SchemeHandler
from compress_cli.quantization.cast import cast_
from compress_cli.quantization.schemes import register_scheme

if TYPE_CHECKING:
    from compress_cli.state import State


def tinygemm_layout(config_class: Any) -> dict[str, Any]:
    """Int4WeightOnlyConfig arguments for tinygemm's tile-packed int4 layout (CUDA kernels built into
    PyTorch, sm80+). torchao 0.15+ defaults to the "plain" layout, whose kernels need the separate
    ``mslk`` package; an older torchao has no such field and defaults to tinygemm already."""
    fields = getattr(config_class, "__dataclass_fields__", {})
    return {"int4_packing_format": "tile_packed_to_4d"} if "int4_packing_format" in fields else {}


def weight_only(model: nn.Module, bits: int, group_size: int, device: Any) -> nn.Module:
    """torchao ``quantize_`` with Int8WeightOnlyConfig / Int4WeightOnlyConfig on a CUDA copy."""
    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        raise StageError(
            f"int{bits}_weight_only needs a CUDA device (torchao's weight-only kernels are CUDA kernels)"
        )
    return quantized_copy(model, bits, group_size, device)


def quantized_copy(model: nn.Module, bits: int, group_size: int, device: Any) -> nn.Module:
    """The torchao conversion itself, on ``device`` as given (:func:`weight_only` checks it is CUDA).

    The copy has its pruning made permanent first: torchao swaps each Linear's ``weight`` for a
    quantized Parameter, which the pruning hook (recomputing ``weight`` from ``weight_orig`` and
    the mask before every forward) would then fail to overwrite; a pruned model's computed weight
    cannot even be deep-copied after a training step. Pruned zeros stay zero on the int8 grid."""
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise StageError(f"int{bits}_weight_only needs torchao: pip install torchao") from None
    from compress_cli.pruning import permanent_copy

    m = permanent_copy(model).to(device).eval()
    with quiet():
        if bits == 8:
            quantize_(m, Int8WeightOnlyConfig())
        else:
            m = m.to(torch.bfloat16)
            quantize_(m, Int4WeightOnlyConfig(group_size=group_size, **tinygemm_layout(Int4WeightOnlyConfig)))
            cast_(m, torch.bfloat16, convert=False)
    return m


@register_scheme("int8_weight_only")
@register_scheme("int4_weight_only")
class WeightOnly(SchemeHandler):
    """A quantized CUDA copy of the model runs; the state keeps the fp32 module the checkpoint stores."""

    def entry(self, state: State, options: Any) -> dict[str, Any]:
        """The scheme, and for int4 its ``group_size``."""
        entry = super().entry(state, options)
        if options.scheme == "int4_weight_only":
            entry["group_size"] = options.group_size
        return entry

    def build_runtime(self, model: nn.Module, entry: dict[str, Any], device: Any = None) -> nn.Module:
        """A torchao-quantized CUDA copy (load(): on the default CUDA device, refused without one)."""
        scheme = entry["scheme"]
        if device is None:
            if not torch.cuda.is_available():
                raise SourceError(
                    f"this model was quantized with {scheme}, which needs a CUDA device to load"
                )
            device = torch.device("cuda")
        bits = 8 if scheme == "int8_weight_only" else 4
        return weight_only(model, bits, entry.get("group_size", 128), device)

    def convert(self, state: State, options: Any, label: str) -> Quantized:
        """As the default; the details name the device."""
        done = super().convert(state, options, label)
        done.details["device"] = str(state.device)
        done.notes = (
            f"torchao {options.scheme} on {state.device} "
            "(the checkpoint keeps fp32 weights; load() re-quantizes them)"
        )
        return done
