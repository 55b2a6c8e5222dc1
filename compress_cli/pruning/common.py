"""Helpers shared by the structural pruning algorithms (channel removal and layer removal)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from compress_cli.errors import StageError

#: calibration batches as the structural algorithms take them: ``(inputs, labels)`` pairs
Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]


def check_forward(model: nn.Module, example: torch.Tensor, out_shape: torch.Size | None, what: str) -> None:
    """After a structural change: raise StageError (prefixed ``what``) unless the model still runs
    on ``example`` in eval mode and gives a finite tensor of shape ``out_shape`` (when given)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            y = model(example)
    except Exception as e:
        raise StageError(
            f"{what}: the model no longer runs ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    finally:
        model.train(was)
    if not isinstance(y, torch.Tensor) or (out_shape is not None and y.shape != out_shape):
        got = getattr(y, "shape", type(y))
        raise StageError(f"{what}: output shape changed to {got} (expected {tuple(out_shape or ())})")
    if not torch.isfinite(y).all():
        raise StageError(f"{what}: the model's outputs are no longer finite")
