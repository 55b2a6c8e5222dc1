"""Stage registry: ``register_stage`` / ``get_stage`` / ``list_stages``, and recipes checked against it.

Stages register themselves when their module is imported; built-in stages live in
``compress_cli.stages`` and external packages add theirs through the entry-point group
``compress_cli.stages`` (each entry point names a module to import), e.g. in their pyproject.toml::

    [project.entry-points."compress_cli.stages"]
    my_stage = "my_package.my_stage"

A plugin that fails to import, or registers a name that is taken, stops the program with one
:class:`CompressError` naming the entry point and the cause (``--debug`` shows the traceback).

``validate`` / ``load_recipe`` / ``json_schema`` are the config layer's functions given the registered
stages: config is below the stages and cannot look them up.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from compress_cli.config.recipe import Recipe
from compress_cli.config.schema import recipe_schema
from compress_cli.config.validation import recipe_from_raw
from compress_cli.config.yaml import RawRecipe, apply_overrides, read_recipe_file
from compress_cli.errors import CompressError, RecipeError, did_you_mean

if TYPE_CHECKING:
    from compress_cli.stages.base import Stage

ENTRY_POINT_GROUP = "compress_cli.stages"

_REGISTRY: dict[str, type[Stage[Any]]] = {}
_LOADED = False  # set once every built-in stage and every plugin imported without error
_LOADING = False  # a stage module that asks the registry while it is being imported sees it as is

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
    """Import the built-in stage modules, then every plugin of the entry-point group (once)."""
    global _LOADED, _LOADING
    if _LOADED or _LOADING:
        return
    _LOADING = True
    try:
        from compress_cli import stages

        for info in pkgutil.iter_modules(stages.__path__):
            if not info.name.startswith("_") and info.name not in ("base", "registry"):
                importlib.import_module(f"{stages.__name__}.{info.name}")
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            _load_plugin(ep)
        _LOADED = True
    finally:
        _LOADING = False


def _load_plugin(ep: EntryPoint) -> None:
    """Import one plugin module; any failure becomes one CompressError naming the entry point."""
    try:
        ep.load()
    except Exception as e:
        dist = f" (package {ep.dist.name})" if ep.dist is not None else ""
        raise CompressError(
            f"stage plugin {ep.name!r} = {ep.value!r}{dist} in entry-point group {ENTRY_POINT_GROUP!r} "
            f"failed to load: {type(e).__name__}: {e}"
        ) from e


def list_stages() -> list[str]:
    """Every registered stage type, sorted."""
    _load_all()
    return sorted(_REGISTRY)


def get_stage(name: str) -> type[Stage[Any]]:
    """The stage class registered as ``name``; an unknown name raises RecipeError with a suggestion."""
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RecipeError(f"unknown stage type {name!r}{did_you_mean(name, _REGISTRY)}") from None


def _stage_specs() -> dict[str, type[Stage[Any]]]:
    """Every registered stage class by type, sorted: what config validates recipes against."""
    _load_all()
    return {name: _REGISTRY[name] for name in sorted(_REGISTRY)}


def validate(raw: RawRecipe) -> Recipe:
    """Both validation passes plus the cross-stage rules; raises RecipeError listing every problem."""
    import compress_cli.sources  # noqa: F401  (registers the model and data source checks with config)

    return recipe_from_raw(raw, _stage_specs())


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> tuple[Recipe, RawRecipe]:
    """Read a recipe file, apply ``--set`` overrides, validate -> (recipe, raw YAML with lines)."""
    raw = read_recipe_file(path)
    apply_overrides(raw, overrides or [])
    return validate(raw), raw


def json_schema() -> dict[str, Any]:
    """JSON Schema of the recipe format, with every registered stage's config (``compress schema``)."""
    return recipe_schema(_stage_specs())
