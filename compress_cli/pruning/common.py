"""Helpers shared by the structural pruning algorithms (channel removal and layer removal)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from compress_cli.errors import StageError

#: calibration batches as the structural algorithms take them: ``(inputs, target)`` pairs (inputs a
#: tensor, tuple or dict; target None for unlabelled data), as ``DataBundle.calibration()`` gives
Batches = Sequence[tuple[Any, Any]]


def output_shapes(model: nn.Module, example: Any) -> list[tuple[int, ...]]:
    """The shapes of the floating-point tensors ``model`` returns on ``example`` (eval, no grad)."""
    from compress_cli._utils.batches import call
    from compress_cli._utils.batches import float_tensors as tensors

    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return [tuple(t.shape) for t in tensors(call(model, example))]
    finally:
        model.train(was)


def check_forward(model: nn.Module, example: Any, out_shape: Sequence[Any] | None, what: str) -> None:
    """After a structural change: raise StageError (prefixed ``what``) unless the model still runs
    on ``example`` in eval mode and gives finite outputs of shapes ``out_shape`` (when given; a
    torch.Size is the shape of a single output tensor)."""
    from compress_cli._utils.batches import call
    from compress_cli._utils.batches import float_tensors as tensors

    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            ys = tensors(call(model, example))
    except Exception as e:
        raise StageError(
            f"{what}: the model no longer runs ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    finally:
        model.train(was)
    if out_shape is not None:
        want = [tuple(out_shape)] if isinstance(out_shape, torch.Size) else [tuple(s) for s in out_shape]
        got = [tuple(y.shape) for y in ys]
        if got != want:
            shown = got[0] if len(got) == 1 else got
            raise StageError(
                f"{what}: output shape changed to {shown} (expected {want[0] if len(want) == 1 else want})"
            )
    if not ys or not all(bool(torch.isfinite(y).all()) for y in ys):
        raise StageError(f"{what}: the model's outputs are no longer finite")
