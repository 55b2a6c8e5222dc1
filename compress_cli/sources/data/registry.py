"""The data-source registry (timm's ``register_model`` style): each kind of ``data.source`` registers
its builder under the way it is written, and :func:`parse` reads a ``data.source`` string against
the registry, so validation (``check_source``) and dispatch (``build_data``) share one grammar.

The grammar: a plain name (``digits``); ``NAME:ARGUMENT`` for a registered name that takes an
argument (``torchvision:CIFAR10``); anything else with a colon goes to the one ``fallback`` source
(``package.module:callable``), which receives the whole string.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from compress_cli.errors import did_you_mean

if TYPE_CHECKING:
    from compress_cli.config.recipe import DataConfig
    from compress_cli.sources.data.bundle import DataBundle

#: ``(data config, seed, argument, sample shape or None) -> DataBundle``; the argument is what
#: follows ``name:`` (the whole source string for the fallback, "" for a plain name)
Builder = Callable[["DataConfig", int, str, "list[int] | None"], "DataBundle"]


@dataclass(frozen=True)
class DataSource:
    """One kind of data source: how it is written, its builder, and what it accepts."""

    usage: str  # as users write it: "digits", "torchvision:NAME", "package.module:callable"
    build: Builder
    #: a problem with the argument, or None (only for sources written with an argument)
    check: Callable[[str], str | None] | None = None
    kwargs: bool = True  # whether it takes ``data.kwargs``
    fallback: bool = False  # receives every ``x:y`` source no other registered name claims
    #: takes ``data.kwargs.tokenizer``, which ``build_data`` fills in from the model's ``hf:`` directory
    tokenizer: bool = False

    @property
    def name(self) -> str:
        """The registry key: the usage up to its colon."""
        return self.usage.partition(":")[0]

    @property
    def takes_argument(self) -> bool:
        """Whether the source is written ``name:ARGUMENT``."""
        return ":" in self.usage


_SOURCES: dict[str, DataSource] = {}


def register_source(
    usage: str,
    *,
    check: Callable[[str], str | None] | None = None,
    kwargs: bool = True,
    fallback: bool = False,
    tokenizer: bool = False,
) -> Callable[[Builder], Builder]:
    """Decorator registering a builder for the data source written ``usage`` (``"digits"``,
    ``"torchvision:NAME"``); ``check`` validates the argument cheaply (no heavy imports),
    ``kwargs=False`` refuses ``data.kwargs``, ``fallback`` takes every unclaimed ``x:y``,
    ``tokenizer`` gets the model's tokenizer directory as ``data.kwargs.tokenizer`` by default."""

    def add(build: Builder) -> Builder:
        entry = DataSource(usage, build, check, kwargs, fallback, tokenizer)
        if entry.name in _SOURCES:
            raise ValueError(f"data source {entry.name!r} is registered twice")
        if fallback and any(s.fallback for s in _SOURCES.values()):
            raise ValueError("only one data source can be the fallback")
        _SOURCES[entry.name] = entry
        return build

    return add


def parse(source: str) -> tuple[DataSource, str] | str:
    """``(registered source, its argument)`` for a ``data.source`` string, or the problem with it
    (unknown names get a did-you-mean over the plain names)."""
    entry = _SOURCES.get(source)
    argument = ""
    if entry is None or entry.takes_argument:
        prefix, colon, rest = source.partition(":")
        claimed = _SOURCES.get(prefix)
        if colon and claimed is not None and claimed.takes_argument and not claimed.fallback:
            entry, argument = claimed, rest
        elif colon and (fallback := next((s for s in _SOURCES.values() if s.fallback), None)):
            entry, argument = fallback, source
        else:
            plain = [s.name for s in _SOURCES.values() if not s.takes_argument]
            written = [
                s.usage for s in sorted(_SOURCES.values(), key=lambda s: s.fallback) if s.takes_argument
            ]
            return f"unknown data source {source!r}{did_you_mean(source, plain)}; or {', '.join(written)}"
    problem = entry.check(argument) if entry.check is not None else None
    return problem if problem else (entry, argument)


def names() -> list[str]:
    """Every registered source as users write it, in registration order."""
    return [s.usage for s in _SOURCES.values()]
