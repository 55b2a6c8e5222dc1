"""The installed vocabulary a recipe is validated against, handed to config from the layers above.

Config is the lowest layer, so it cannot look up stages or parse source strings itself: the caller
(``compress_cli.stages.registry.catalog``) passes the registered stage classes and the model/data
source checks. While a recipe is validated the catalog is *active* (a context variable), so the
``source`` field validators of ``ModelConfig``/``DataConfig`` see it wherever those models are
nested: at the top level, inside a stage config (distill's teacher), or inside a config that a stage
validates by hand (hpo's wrapped stages). Validated outside :func:`Catalog.active`, source strings
are only type-checked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from compress_cli.config.stage import StageSpec

#: returns one problem line for a source string, or None when it is fine
SourceCheck = Callable[[str], str | None]


@dataclass(frozen=True)
class Catalog:
    """Stage types by name, plus the checks for ``model.source`` and ``data.source`` strings."""

    stages: Mapping[str, StageSpec]
    check_model_source: SourceCheck
    check_data_source: SourceCheck

    @contextmanager
    def active(self) -> Iterator[Catalog]:
        """Make this catalog the one the source validators consult, for the ``with`` block."""
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)


_ACTIVE: ContextVar[Catalog | None] = ContextVar("compress_cli_config_catalog", default=None)


def check_source(kind: Literal["model", "data"], value: str) -> str:
    """Field-validator body: raise ``ValueError(problem)`` if the active catalog rejects ``value``."""
    catalog = _ACTIVE.get()
    if catalog is None:
        return value
    check = catalog.check_model_source if kind == "model" else catalog.check_data_source
    problem = check(value)
    if problem:
        raise ValueError(problem)
    return value
