"""Load transforms: what ``load()`` replays after the weights are in (e.g. quantization).

A stage that leaves the model in a form the weights alone cannot describe (an int8 runtime built
from fp32 weights) records an entry ``{"type": NAME, ...}`` in the manifest's ``transforms`` and
registers two functions under NAME: the load transform (``load()``: stored module -> the module the
report measured) and the restorer (the pipeline's snapshot restore: bring back what the stage left
in the state, e.g. its runner). This module imports nothing heavy, so stage modules can register at
import time without slowing ``compress --help``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from compress_cli.errors import SourceError

if TYPE_CHECKING:
    import torch
    from torch import nn

_TRANSFORMS: dict[str, Callable[[nn.Module, dict[str, Any], dict[str, torch.Tensor]], nn.Module]] = {}


def register_transform(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """``fn(model, params, state_dict) -> model``, run by load() after the weights are loaded."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _TRANSFORMS[name] = fn
        return fn

    return deco


_RESTORERS: dict[str, Callable[[Any, dict[str, Any]], None]] = {}


def register_restore(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """``fn(state, entry)`` for a load transform: when the pipeline restores a snapshot (``--resume``,
    a guard's revert) it puts the *stored* module in ``state.model`` (``load(apply_transforms=False)``)
    and calls this for each transform entry, to bring back what the stage left (e.g. ``state.runner``)."""

    def deco(fn: Callable[..., None]) -> Callable[..., None]:
        _RESTORERS[name] = fn
        return fn

    return deco


def restore_transforms(state: Any) -> None:
    """Replay ``state.transforms`` on a state whose model came from ``load(apply_transforms=False)``."""
    for t in state.transforms:
        if t["type"] not in _RESTORERS:
            _import_transform_provider(t["type"])
        fn = _RESTORERS.get(t["type"])
        if fn is None:
            raise SourceError(
                f"snapshot needs transform {t['type']!r}, which cannot be restored by this version"
            )
        fn(state, t)


def load_transform(name: str) -> Callable[..., nn.Module] | None:
    """The load transform registered as ``name`` (its provider imported on first use), or None."""
    if name not in _TRANSFORMS:
        _import_transform_provider(name)
    return _TRANSFORMS.get(name)


#: load transform -> the module whose import registers it (and its restorer), imported by name only
#: when a manifest or a snapshot lists that transform: loading never imports the stages
TRANSFORM_PROVIDERS = {"quantize": "compress_cli.quantization.transforms"}


def _import_transform_provider(name: str) -> None:
    """Register transform ``name``: import its module from :data:`TRANSFORM_PROVIDERS`, or for a
    name not in it, the plugins' modules (a third-party transform registers itself on import)."""
    import importlib

    from compress_cli._utils.plugins import load_plugins

    if name in TRANSFORM_PROVIDERS:
        importlib.import_module(TRANSFORM_PROVIDERS[name])
        return
    try:
        load_plugins()
    except ImportError as e:
        raise SourceError(f"load transform {name!r}: {e}") from None
