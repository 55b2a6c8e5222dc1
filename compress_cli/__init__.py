"""compress: make PyTorch models smaller and faster, and tune them, from YAML recipes.

Public API::

    import compress_cli
    model = compress_cli.load("runs/quickstart/model")      # rebuild a compressed model
    report = compress_cli.run("recipes/quickstart.yaml")    # run a recipe, returns report dict
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress_cli._version import __version__

if TYPE_CHECKING:
    from torch import nn

__all__ = ["__version__", "load", "run"]


def load(path: str | Path, *, trust_source: bool = False) -> nn.Module:
    """Rebuild a model directory written by ``compress run`` (``OUTPUT/model``), in eval mode.

    A model directory is data: when its manifest names a ``package.module:callable`` model source
    (code), loading it runs that code, so it is refused unless ``trust_source=True``, in the spirit
    of Hugging Face's ``trust_remote_code``. Built-in sources (``zoo:``, ``torchvision:``) need no
    opt-in.
    """
    from compress_cli.sources.models import load_model_dir

    return load_model_dir(path, trust_source=trust_source)


def run(
    recipe: str | Path,
    *,
    overrides: list[str] | None = None,
    force: bool = False,
    device: str | None = None,
    output: str | None = None,
) -> dict[str, Any]:
    """Validate and run a recipe file; returns the report (as written to report.json)."""
    from compress_cli.engine.run import run_recipe
    from compress_cli.stages.registry import load_recipe
    from compress_cli.tracking import finishing, tracker_for

    r, raw = load_recipe(recipe, (overrides or []) + ([f"output={output}"] if output else []))
    tracker = tracker_for(r, raw.where(("tracking", "mlflow")), notify=_warn_only)
    with finishing(tracker):
        return run_recipe(r, force=force, device=device, listener=tracker)


def _warn_only(text: str) -> None:
    """A tracker's warning (server down, ...) as a Python warning; its other lines are not shown."""
    if text.startswith("warning:"):
        import warnings

        warnings.warn(text, RuntimeWarning, stacklevel=3)
