"""The model-source grammar, written once: what a ``model.source`` string names.

``zoo:NAME`` (a built-in network), ``torchvision:NAME``, ``timm:NAME`` (a timm architecture),
``hf:PATH_OR_NAME`` (a Hugging Face transformers model: a local directory, or a hub name where the
user allows downloading), ``package.module:callable`` (code: the user's own, or a trusted model
directory's) or a path to a compressed model directory. Recipe
validation (``check_model_source``), the builder (``sources.models.build_from_source``) and the
model-directory trust rule (``manifest_source_problem``) all parse with ``parse_model_source``.
Imports nothing heavy: ``compress validate`` checks sources without torch.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from compress_cli.errors import did_you_mean

#: the built-in zoo networks (``sources.zoo`` builds each from the function of the same name)
ZOO_NAMES = (
    "digits_mlp",
    "digits_cnn",
    "digits_resnet",
    "lenet5",
    "fashion_cnn",
    "fashion_cnn_small",
    "outlier_cnn",
)

#: source kinds that name no code: a model directory may name them without being trusted (an
#: ``hf:`` config that asks for custom code, ``auto_map``, is refused where it is read)
BUILTIN_KINDS = ("zoo", "torchvision", "timm", "hf")

_EXPECTED = "expected zoo:NAME, torchvision:NAME, timm:NAME, hf:PATH_OR_NAME or package.module:callable"
#: an example of each built-in kind that takes a name, for the message when the name is missing
_EXAMPLES = {"torchvision": "torchvision:resnet18", "timm": "timm:resnet18", "hf": "hf:path/to/hf_model_dir"}

#: the opt-in a model directory whose manifest names code needs, in every place it can be given
TRUST_HINT = (
    "if you trust it, opt in: compress_cli.load(dir, trust_source=True), "
    "model.trust_source: true in the recipe, or --trust-source"
)


@dataclass(frozen=True)
class ModelSource:
    """A parsed ``model.source``: ``kind`` and ``name`` (the model name, the module of a
    callable, or the directory's path); ``attr`` is the callable's name."""

    kind: Literal["zoo", "torchvision", "timm", "hf", "callable", "directory"]
    name: str
    attr: str = ""


def parse_model_source(source: str) -> ModelSource:
    """The kind of source ``source`` names, by syntax alone (no file or import is looked at);
    ValueError with a one-line problem when it fits no kind."""
    kind, sep, name = source.partition(":")
    if kind in BUILTIN_KINDS:
        if kind in _EXAMPLES and not name.strip():
            raise ValueError(f"{kind}: needs a model name, e.g. {_EXAMPLES[kind]}")
        return ModelSource(kind, name)  # type: ignore[arg-type]
    if not sep:
        return ModelSource("directory", source)
    if kind and name and all(p.isidentifier() for p in kind.split(".")) and name.isidentifier():
        return ModelSource("callable", kind, name)
    raise ValueError(f"{_EXPECTED} (got {source!r})")


def check_model_source(source: str) -> str | None:
    """A problem with a recipe's ``model.source`` string, or None. Cheap: imports nothing heavy."""
    try:
        parsed = parse_model_source(source)
    except ValueError as e:
        return str(e)
    if parsed.kind == "zoo" and parsed.name not in ZOO_NAMES:
        return f"unknown zoo model {parsed.name!r}{did_you_mean(parsed.name, ZOO_NAMES)}"
    if parsed.kind == "directory" and not (Path(source) / "manifest.json").is_file():
        return f"{_EXPECTED} or a compressed model directory (got {source!r})"
    return None


def manifest_source_problem(source: str, trust_source: bool | Collection[str]) -> str | None:
    """Why a model directory's manifest may not name ``source``, or None.

    A manifest may name built-in sources only: a directory is data, and loading it must not run
    code from it. A ``package.module:callable`` is allowed when ``trust_source`` is True or lists
    it (the caller's own sources, e.g. the recipe's ``model.source``); a path never is.
    """
    try:
        parsed = parse_model_source(source)
    except ValueError as e:
        return f"model.source: {e}"
    if parsed.kind == "directory":
        return f"model.source {source!r} is a path; a manifest names the model source it was built from"
    if parsed.kind == "callable" and not (
        trust_source is True or (not isinstance(trust_source, bool) and source in trust_source)
    ):
        return (
            f"model.source {source!r} is code (package.module:callable), which a model directory "
            f"may not run unless trusted; {TRUST_HINT}"
        )
    return None
