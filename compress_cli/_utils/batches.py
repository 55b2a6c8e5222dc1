"""Structured batches: what a model is called with and what it returns, whatever their structure.

*Inputs* are what ``forward`` receives: a tensor (one positional argument), a tuple or list
(positional arguments) or a dict (keyword arguments, Hugging Face style) — the convention of
torch-pruning's ``example_inputs`` and of ``torch.onnx.export``. *Batches* are what a data loader
yields: a tensor, a tuple/list, or a dict of tensors (any nesting); the task splits them into inputs
and targets (:mod:`compress_cli.tasks`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn


def call(model: Any, inputs: Any) -> Any:
    """``model`` called on ``inputs``: ``model(**d)`` for a dict, ``model(*t)`` for a tuple or list,
    ``model(x)`` otherwise."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``obj`` with ``fn`` applied to every tensor in it (dicts, tuples, lists, dataclass-like
    ``ModelOutput`` mappings kept as plain dicts); anything else is returned as it is."""
    import torch

    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(map_tensors(v, fn) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def to_device(obj: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """``obj`` with every tensor moved to ``device``."""
    return map_tensors(obj, lambda t: t.to(device, non_blocking=non_blocking))


def tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in ``obj``, depth first, in order."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from tensors(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from tensors(v)


def float_tensors(obj: Any) -> list[torch.Tensor]:
    """Every floating-point (or complex) tensor in ``obj``, in order: the values of a model output."""
    return [t for t in tensors(obj) if t.is_floating_point() or t.is_complex()]


def batch_size(obj: Any) -> int:
    """The leading dimension of the first tensor in ``obj`` (the batch size of a batch)."""
    for t in tensors(obj):
        return int(t.shape[0]) if t.dim() else 1
    raise ValueError(f"no tensor in the batch ({type(obj).__name__})")


def take(obj: Any, n: int) -> Any:
    """The first ``n`` samples of a batch, repeating samples when it holds fewer than ``n``."""

    def cut(t: torch.Tensor) -> torch.Tensor:
        if not t.dim():
            return t
        if t.shape[0] >= n:
            return t[:n]
        reps = -(-n // t.shape[0])
        return t.repeat(reps, *([1] * (t.dim() - 1)))[:n]

    return map_tensors(obj, cut)


def samples(obj: Any, start: int, stop: int) -> Any:
    """Samples ``start`` to ``stop`` (exclusive) of a batch, every tensor cut along dimension 0
    (scalar tensors kept as they are)."""
    return map_tensors(obj, lambda t: t[start:stop] if t.dim() else t)


def concat(batches: list[Any]) -> Any:
    """One batch made of several of the same structure, concatenated along dimension 0."""
    import torch

    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(batches)
    if isinstance(first, Mapping):
        return {k: concat([b[k] for b in batches]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(concat([b[i] for b in batches]) for i in range(len(first)))
    return first


def describe(obj: Any) -> str:
    """A short description for reports and errors: ``[2, 1, 28, 28] float32`` or
    ``input_ids [32, 128] int64, attention_mask [32, 128] int64``."""
    import torch

    if isinstance(obj, torch.Tensor):
        return f"{list(obj.shape)} {str(obj.dtype).removeprefix('torch.')}"
    if isinstance(obj, Mapping):
        return ", ".join(f"{k} {describe(v)}" for k, v in obj.items())
    if isinstance(obj, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in obj) + ")"
    return type(obj).__name__


def sample_shape(inputs: Any) -> list[int] | dict[str, list[int]] | list[Any]:
    """The shape of one sample of ``inputs`` (batch dimension dropped), per tensor, in their structure."""
    import torch

    if isinstance(inputs, torch.Tensor):
        return list(inputs.shape[1:])
    if isinstance(inputs, Mapping):
        return {k: sample_shape(v) for k, v in inputs.items()}  # type: ignore[misc]
    if isinstance(inputs, (tuple, list)):
        return [sample_shape(v) for v in inputs]
    return []


def forward_kwargs(model: nn.Module) -> set[str]:
    """The names ``model.forward`` accepts as keywords (empty when it takes ``**kwargs``: any)."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return set()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return set()
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
