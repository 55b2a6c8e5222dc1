"""The ``quantize`` load transform and snapshot restorer: how a stored quantized model runs again.

The checkpoint package imports this module by name (its provider table) only when a manifest or a
snapshot lists a ``quantize`` transform; ``compress_cli.load()`` never imports the stages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from compress_cli.checkpoint import register_restore, register_transform
from compress_cli.quantization.schemes import handler

if TYPE_CHECKING:
    from torch import nn

    from compress_cli.state import State


def build_runtime(model: nn.Module, entry: dict[str, Any], device: Any = None) -> nn.Module:
    """The runtime module for a stored (snapped) model and its ``transforms`` entry, as the
    ``quantize`` stage built it (see the scheme's handler)."""
    return handler(entry["scheme"]).build_runtime(model, entry, device)


@register_transform("quantize")
def load_quantized(model: nn.Module, entry: dict[str, Any], state_dict: Any) -> nn.Module:
    """load(): the runtime module the report measured."""
    return build_runtime(model, entry)


@register_restore("quantize")
def restore_quantized(state: State, entry: dict[str, Any]) -> None:
    """--resume / revert: rebuild the runtime from the stored module, and its runner, as the stage did."""
    h = handler(entry["scheme"])
    state.runner = h.runner(h.build_runtime(state.model, entry, state.device), entry, state)
