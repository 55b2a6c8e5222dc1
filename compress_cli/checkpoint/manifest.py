"""The model directory's manifest: ``DIR/manifest.json``, what the weights file cannot say.

It names the model source the architecture is rebuilt from, the architecture diff against it, the
load transforms to replay, the edit log, and the weights file. It is JSON, written one top-level
key per line, and read back without importing torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compress_cli.errors import SourceError

FORMAT = "compress-model"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors.xz"
WEIGHTS_ZSTD = "weights.safetensors.zst"

#: a manifest is a few KB (446 bytes for the deep-compressed Fashion CNN); anything near this is
#: not one of ours, and reading it would be the cost
MANIFEST_MAX_BYTES = 16 << 20
#: bounds on manifest values: sizes (input dims, classes), rank of a shape, nesting of kwargs
MAX_SIZE = 2**31 - 1
MAX_RANK = 8
MAX_DEPTH = 32
#: problems reported at once (a broken manifest can have thousands)
MAX_PROBLEMS = 10
#: the model-spec fields a manifest may have
_MODEL_FIELDS = ("source", "kwargs", "checkpoint", "input_shape", "allow_pickle")


def manifest_text(manifest: dict[str, Any]) -> str:
    """One top-level key per line, each value compact: readable, and 50-70 % of ``indent=2``'s size
    (the manifest counts in the checkpoint's size: 446 of the deep-compressed Fashion CNN's 14,806
    bytes, 605 with ``indent=2``)."""
    lines = [
        f"{json.dumps(k)}: {json.dumps(v, separators=(',', ':'), default=str)}" for k, v in manifest.items()
    ]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def checkpoint_size(directory: Path | str) -> int:
    """Bytes on disk of a model directory (manifest + weights)."""
    d = Path(directory)
    return sum(p.stat().st_size for p in (d / MANIFEST, d / WEIGHTS, d / WEIGHTS_ZSTD) if p.exists())


def is_model_dir(path: Path | str) -> bool:
    """Whether ``path`` is a model directory (it holds a manifest)."""
    return (Path(path) / MANIFEST).is_file()


def read_manifest(directory: Path | str) -> dict[str, Any]:
    """The manifest of a model directory, read as untrusted data: SourceError when it is missing,
    unreadable, not ours, or any field is malformed (one located line per problem)."""
    d = Path(directory)
    path = d / MANIFEST
    try:
        if not path.is_file():
            raise FileNotFoundError
        with path.open("rb") as f:
            raw = f.read(MANIFEST_MAX_BYTES + 1)
        if len(raw) > MANIFEST_MAX_BYTES:
            raise SourceError(f"{path}: larger than the {MANIFEST_MAX_BYTES:,} bytes a manifest may have")
        manifest = json.loads(raw)
    except FileNotFoundError:
        raise SourceError(f"{d}: not a compressed model directory ({MANIFEST} missing)") from None
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested too deep
        raise SourceError(f"{path}: unreadable manifest: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SourceError(f"{path}: not a {FORMAT} manifest")
    version = manifest.get("version")
    if type(version) is int and version > FORMAT_VERSION:
        raise SourceError(f"{path}: format version {version} is newer than this tool supports")
    problems = manifest_problems(manifest)
    if problems:
        raise SourceError([f"{path}: {p}" for p in problems])
    return manifest


def manifest_problems(manifest: dict[str, Any]) -> list[str]:
    """What is wrong with a parsed manifest, one located line each (empty: it is well formed).

    Every field is checked for type and bounds before anything acts on it; ``model.source`` is
    only checked to be a string here: which sources a directory may name is ``sources``' rule.
    Keys this version does not know (``save_model``'s ``extra``) are kept and never interpreted.
    """
    from compress_cli.checkpoint.architecture import architecture_problems

    problems: list[str] = []
    if type(manifest.get("version")) is not int or manifest["version"] < 1:
        problems.append(f"version: must be a format version from 1 to {FORMAT_VERSION}")
    problems += _model_problems(manifest.get("model"))
    if manifest.get("input_shape") != [] and not _is_shape(manifest.get("input_shape"), min_size=1):
        # [] : structured inputs (a dict or tuple), which the input shape does not describe
        problems.append(f"input_shape: must be a list of 1 to {MAX_RANK} positive sizes (or [])")
    num_classes = manifest.get("num_classes")
    if num_classes is not None and not (type(num_classes) is int and 1 <= num_classes <= MAX_SIZE):
        problems.append(f"num_classes: must be null or a positive int (got {num_classes!r:.60})")
    model = manifest.get("model")
    source = model.get("source") if isinstance(model, dict) else None
    source = source if isinstance(source, str) else None
    problems += architecture_problems(manifest.get("architecture", []), source)
    for key in ("transforms", "edits"):
        entries = manifest.get(key, [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            problems.append(f"{key}: must be a list of mappings")
    for i, t in enumerate(manifest.get("transforms", [])):
        if isinstance(t, dict) and not isinstance(t.get("type"), str):
            problems.append(f"transforms[{i}].type: must name a load transform")
    if manifest.get("weights", WEIGHTS) not in (WEIGHTS, WEIGHTS_ZSTD):
        problems.append(f"weights: must be {WEIGHTS} or {WEIGHTS_ZSTD} (got {manifest['weights']!r:.60})")
    return problems[:MAX_PROBLEMS]


def _model_problems(model: object) -> list[str]:
    """``model``: the source spec the architecture is rebuilt from. Besides ``source`` and
    ``kwargs``, versions so far also wrote the recipe's other model fields, at their defaults: a
    manifest names no checkpoint file and allows no pickles."""
    if not isinstance(model, dict):
        return ["model: must be a mapping with a source"]
    problems = [f"model.{k}: not a field of a model spec" for k in model if k not in _MODEL_FIELDS]
    source = model.get("source")
    if not isinstance(source, str) or not 0 < len(source) <= 1000:
        problems.append("model.source: must be a model source string")
    kwargs = model.get("kwargs", {})
    if not isinstance(kwargs, dict):
        problems.append("model.kwargs: must be a mapping")
    elif _depth(kwargs) > MAX_DEPTH:
        problems.append(f"model.kwargs: nested deeper than {MAX_DEPTH}")
    if model.get("checkpoint") is not None:
        problems.append(f"model.checkpoint: must be null in a manifest (got {model['checkpoint']!r:.60})")
    if model.get("allow_pickle", False) is not False:
        problems.append("model.allow_pickle: must be false in a manifest")
    if model.get("input_shape") is not None and not _is_shape(model["input_shape"], min_size=1):
        problems.append(f"model.input_shape: must be null or a list of 1 to {MAX_RANK} positive sizes")
    return problems


def _is_shape(value: object, min_size: int) -> bool:
    return (
        isinstance(value, list)
        and 1 <= len(value) <= MAX_RANK
        and all(type(v) is int and min_size <= v <= MAX_SIZE for v in value)
    )


def _depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0
