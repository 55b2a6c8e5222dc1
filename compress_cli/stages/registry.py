"""Stage registry: ``register_stage`` / ``get_stage`` / ``list_stages``.

Stages register themselves when their module is imported; built-in stages live in
``compress_cli.stages`` and external packages add theirs through the entry-point group
``compress_cli.stages`` (each entry point names a module to import).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, TypeVar

from compress_cli.errors import RecipeError, did_you_mean

if TYPE_CHECKING:
    from compress_cli.stages.base import Stage

_REGISTRY: dict[str, type[Stage[Any]]] = {}
_LOADED = False

S = TypeVar("S", bound="type[Stage[Any]]")


def register_stage(name: str) -> Callable[[S], S]:
    """Class decorator: make ``cls`` available to recipes as ``type: name``."""

    def deco(cls: S) -> S:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"stage {name!r} is already registered by {existing.__module__}")
        cls.type_name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from compress_cli import stages

    for info in pkgutil.iter_modules(stages.__path__):
        if not info.name.startswith("_") and info.name not in ("base", "registry"):
            importlib.import_module(f"{stages.__name__}.{info.name}")
    for ep in entry_points(group="compress_cli.stages"):
        ep.load()


def list_stages() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_stage(name: str) -> type[Stage[Any]]:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RecipeError(f"unknown stage type {name!r}{did_you_mean(name, _REGISTRY)}") from None
