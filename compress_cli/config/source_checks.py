"""Checks of ``model.source`` / ``data.source`` strings, registered by the sources package.

Config is the lowest layer, so it cannot import ``compress_cli.sources`` to learn which sources
exist. The sources package registers its torch-free checks here when it is imported (the way stages
register with the stage registry), and the ``source`` validators of ``ModelConfig``/``DataConfig``
call them wherever those models are validated: at the top of a recipe, inside a stage config
(distill's teacher), or directly. ``compress_cli.stages.registry.validate`` imports the sources
package first, so a recipe is always checked; in a process that never imported it, a source string
is only type-checked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

#: returns one problem line for a source string, or None when it is fine
SourceCheck = Callable[[str], str | None]
SourceKind = Literal["model", "data"]

_CHECKS: dict[SourceKind, SourceCheck] = {}


def register_source_check(kind: SourceKind, check: SourceCheck) -> None:
    """Make ``check`` the test every ``kind`` source string (``model.source``/``data.source``) passes."""
    _CHECKS[kind] = check


def check_source(kind: SourceKind, value: str) -> str:
    """Field-validator body: ``value``, or ``ValueError(problem)`` if the registered check rejects it."""
    check = _CHECKS.get(kind)
    problem = check(value) if check else None
    if problem:
        raise ValueError(problem)
    return value
