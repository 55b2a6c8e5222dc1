"""Generic ``nn.Module`` helpers: select modules by name globs, swap a submodule, read a tensor
attribute, find the device, and record which layers one forward pass calls.

Used by pruning, codebook, quantization and the run state. Importing this module does not import
torch (the run state imports it on the torch-free ``compress validate`` path).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn


def matches_any(name: str, globs: Iterable[str]) -> bool:
    """True when ``name`` matches one of the fnmatch ``globs`` (case-sensitive)."""
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def select_modules(
    model: nn.Module,
    include: Iterable[str] = ("*",),
    exclude: Iterable[str] = (),
    kinds: tuple[type, ...] = (),
) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the named submodules (the root excluded) matching an ``include`` glob
    and no ``exclude`` glob, and, when ``kinds`` is given, an instance of one of them."""
    inc, exc = list(include), list(exclude)
    out = []
    for name, mod in model.named_modules():
        if not name or (kinds and not isinstance(mod, kinds)):
            continue
        if matches_any(name, inc) and not matches_any(name, exc):
            out.append((name, mod))
    return out


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at dotted ``path`` inside ``model``; returns the module it replaced."""
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old


def tensor_attr(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """``module.<name>`` typed as the tensor it is (nn.Module attributes type as Tensor | Module)."""
    import torch

    t = getattr(module, name)
    assert isinstance(t, torch.Tensor), f"{type(module).__name__}.{name} is not a tensor"
    return t


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    import torch

    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def executed_order(model: nn.Module, example: Any, kinds: tuple[type, ...] | None = None) -> list[str]:
    """Names of the ``kinds`` modules (default: convolutions and linears) in the order one forward
    pass over ``example`` calls them, in eval mode without gradients; the mode is restored."""
    import torch
    from torch import nn

    if kinds is None:
        kinds = (nn.modules.conv._ConvNd, nn.Linear)
    order: list[str] = []
    hooks = []
    for name, mod in model.named_modules():
        if name and isinstance(mod, kinds):
            hooks.append(
                model.get_submodule(name).register_forward_hook(lambda m, i, o, n=name: order.append(n))
            )
    from compress_cli._utils.batches import call

    try:
        was = model.training
        model.eval()
        with torch.no_grad():
            call(model, example)  # a dict is keyword arguments (Hugging Face), as torch-pruning takes them
        model.train(was)
    finally:
        for h in hooks:
            h.remove()
    return order


def output_layers(model: nn.Module, example: Any) -> list[str]:
    """The layers producing the model's outputs: the last conv/linear a forward pass runs, and
    every conv/linear whose output tensor (or a view of it: a transpose, a reshape) the model
    returns, e.g. each head of a dict output; in the order they run."""
    import torch
    from torch import nn

    from compress_cli._utils.batches import call, float_tensors

    produced: dict[int, str] = {}  # storage of each conv/linear output -> the layer's name
    order: list[str] = []

    def hook(name: str) -> Any:
        def record(_m: Any, _i: Any, out: Any) -> None:
            order.append(name)
            if isinstance(out, torch.Tensor):
                produced[out.untyped_storage().data_ptr()] = name

        return record

    hooks = [
        mod.register_forward_hook(hook(name))
        for name, mod in model.named_modules()
        if name and isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear))
    ]
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            outs = float_tensors(call(model, example))
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    found = {produced[p] for p in (t.untyped_storage().data_ptr() for t in outs) if p in produced}
    found.update(order[-1:])
    return [n for n in dict.fromkeys(order) if n in found]
