"""Where a model's forward turns a tensor computed from its input into a Python value.

``if x.sum() > 0:``, ``n = int(mask.sum())``: a graph capture cannot keep such a value variable.
``torch.export`` refuses it; the TorchScript ONNX exporter records the value of the example it ran
and replays it for every input (a silently wrong graph). One forward pass under a
:class:`~torch.overrides.TorchFunctionMode` that follows which tensors derive from the input finds
these places, with the source line, so the int8 schemes that capture a graph refuse the model up
front instead of converting the wrong graph or failing after the baseline.
"""

from __future__ import annotations

import traceback
import weakref
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from compress_cli._utils.batches import call
from compress_cli.quantization.fold import _tensors_in

#: the tensor methods that hand a value to Python
_TO_PYTHON = {
    torch.Tensor.__bool__,
    torch.Tensor.item,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.tolist,
}


def _user_frame() -> str:
    """The innermost stack frame outside torch and this module: 'file:line (code)'."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        f = frame.filename.replace("\\", "/")
        if "/torch/" in f or f.endswith(("quantization/branches.py", "quantization/fold.py")):
            continue
        return f"{frame.filename}:{frame.lineno} ({(frame.line or '').strip()})"
    return "an unknown place"


class _Taint(TorchFunctionMode):
    """Marks every tensor computed from a tainted one; records the places a tainted tensor is read
    into Python."""

    def __init__(self, inputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.tainted: dict[int, weakref.ref[torch.Tensor]] = {}
        self.found: list[str] = []
        for t in inputs:
            self._mark(t)

    def _mark(self, t: torch.Tensor) -> None:
        self.tainted[id(t)] = weakref.ref(t)

    def _is_tainted(self, t: torch.Tensor) -> bool:
        ref = self.tainted.get(id(t))
        return ref is not None and ref() is t

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        read: list[torch.Tensor] = []
        _tensors_in(args, read)
        _tensors_in(kwargs, read)
        dependent = any(self._is_tainted(t) for t in read)
        if dependent and func in _TO_PYTHON:
            where = _user_frame()
            if where not in self.found:
                self.found.append(where)
        out = func(*args, **kwargs)
        if dependent:
            produced: list[torch.Tensor] = []
            _tensors_in(out, produced)
            for t in produced:
                self._mark(t)
        return out


def value_branches(model: nn.Module, example: Any) -> list[str]:
    """The places (``file:line (code)``, first seen first) where ``model``'s forward on ``example``
    (a tensor, tuple or dict of inputs) reads a tensor that depends on its input into a Python
    value (``bool``, ``int``, ``float``, ``.item()``, ``.tolist()``)."""
    inputs: list[torch.Tensor] = []
    _tensors_in(example, inputs)
    mode = _Taint(inputs)
    with torch.no_grad(), mode:
        call(model, example)
    return mode.found
