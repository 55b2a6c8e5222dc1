"""Third-party plugins: the modules named by the entry-point group ``compress_cli.stages``.

Importing a plugin module registers what it defines: stages, quantization schemes, load transforms.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

GROUP = "compress_cli.stages"


def load_plugins() -> None:
    """Import every plugin module (again costs nothing: Python caches modules).

    Raises ImportError naming the entry point whose module fails to import, so callers can report
    one located line instead of the plugin's traceback."""
    for ep in entry_points(group=GROUP):
        try:
            ep.load()
        except Exception as e:
            raise ImportError(
                f"plugin entry point {ep.name} = {ep.value} failed to import ({type(e).__name__}: {e})"
            ) from e


def load_callable(reference: str, key: str) -> Callable[..., Any]:
    """The callable a ``package.module:callable`` string names; ValueError-free: raises
    RecipeError located at ``key`` (the recipe key that holds it) when it cannot be imported."""
    import importlib

    from compress_cli.errors import RecipeError, did_you_mean

    mod_name, _, attr = reference.partition(":")
    if not mod_name or not attr:
        raise RecipeError(f"{key}: expected package.module:callable (got {reference!r})")
    try:
        module = importlib.import_module(mod_name)
    except Exception as e:
        raise RecipeError(
            f"{key} {reference}: cannot import {mod_name!r} ({type(e).__name__}: {e})"
        ) from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise RecipeError(
            f"{key} {reference}: {mod_name!r} has no callable {attr!r}{did_you_mean(attr, names)}"
        )
    return fn
