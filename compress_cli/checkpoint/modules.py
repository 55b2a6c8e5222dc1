"""Modules the compressor itself puts into a model, which every manifest may name.

``PassThrough`` is the bypass of a removed layer that its parent calls with more than the
hidden state (a transformer encoder layer gets ``(hidden_states, attention_mask, ...)``):
``nn.Identity`` takes one argument, this one returns its first and ignores the rest.
"""

from __future__ import annotations

from typing import Any

from torch import nn


class PassThrough(nn.Module):
    """Return the first positional argument unchanged; every other argument is ignored."""

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        """``x`` itself."""
        return x
