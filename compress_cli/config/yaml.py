"""Recipe YAML in and out: parsing with a line number for every key path, and ``--set`` overrides.

Problems name ``FILE:LINE`` (or the ``--set key=value`` that put a value there), so every
validation message points at what the user has to edit.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from compress_cli.errors import RecipeError

if TYPE_CHECKING:
    from compress_cli.config.recipe import Recipe


class _LineLoader(yaml.SafeLoader):
    pass


def _lines(node: yaml.Node, path: tuple[Any, ...], out: dict[tuple[Any, ...], int]) -> None:
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            sub = (*path, k.value)
            _lines(v, sub, out)
            out[sub] = k.start_mark.line + 1  # a key's line, not its value's (which the call set)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _lines(v, (*path, i), out)


class RawRecipe:
    """The parsed YAML plus a map from key path to line number."""

    def __init__(self, data: Any, lines: dict[tuple[Any, ...], int], filename: str):
        self.data = data
        self.lines = lines
        self.filename = filename
        self.overridden: dict[tuple[Any, ...], str] = {}

    def where(self, path: tuple[Any, ...]) -> str:
        """``FILE:LINE`` of the nearest located ancestor of ``path``, or ``--set ...`` if overridden."""
        for n in range(len(path), 0, -1):
            if tuple(path[:n]) in self.overridden:
                return f"--set {self.overridden[tuple(path[:n])]}"
        p = tuple(path)
        while p and p not in self.lines:
            p = p[:-1]
        line = self.lines.get(p)
        return f"{self.filename}:{line}" if line else self.filename


def parse_yaml(text: str, filename: str = "<recipe>") -> RawRecipe:
    """Parse recipe text; a syntax error raises one located :class:`RecipeError`."""
    try:
        node = yaml.compose(text, Loader=_LineLoader)
        data = yaml.load(text, Loader=_LineLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark else ""
        ctx = ""
        if e.context and e.context_mark and e.problem_mark and e.context_mark.line != e.problem_mark.line:
            ctx = f" ({e.context.replace('while parsing', 'in')} started at line {e.context_mark.line + 1})"
        raise RecipeError(f"{filename}{line}: YAML syntax error: {e.problem or e}{ctx}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{filename}: YAML error: {e}") from None
    lines: dict[tuple[Any, ...], int] = {}
    if node is not None:
        _lines(node, (), lines)
    return RawRecipe(data, lines, filename)


def read_recipe_file(path: str | Path) -> RawRecipe:
    """Read and parse a recipe file; an unreadable path raises :class:`RecipeError`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{p}: recipe file not found") from None
    except IsADirectoryError:
        raise RecipeError(f"{p}: is a directory, expected a recipe YAML file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{p}: cannot read recipe: {e}") from None
    return parse_yaml(text, str(p))


def apply_overrides(raw: RawRecipe, overrides: list[str]) -> None:
    """``key.path=value``: value parsed as YAML; list indices are numbers. Creates missing keys."""
    if overrides and not isinstance(raw.data, dict):
        raw.data = {}
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item}: expected key.path=value")
        key, _, text = item.partition("=")
        parts: list[Any] = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
        if not all(str(p) for p in parts):
            raise RecipeError(f"--set {item}: empty key in path")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        node: Any = raw.data
        for depth, part in enumerate(parts[:-1]):
            nxt = parts[depth + 1]
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                if isinstance(node, dict):
                    node[part] = [] if isinstance(nxt, int) else {}
                    node = node[part]
                else:
                    raise RecipeError(
                        f"--set {item}: no element {'.'.join(map(str, parts[: depth + 1]))}"
                    ) from None
        last = parts[-1]
        try:
            if isinstance(node, list) and isinstance(last, int) and last == len(node):
                node.append(value)
            else:
                node[last] = value
        except (IndexError, TypeError):
            raise RecipeError(f"--set {item}: no element {key}") from None
        raw.overridden[tuple(parts)] = item


def recipe_to_yaml(recipe: Recipe, filled: dict[str, Any] | None = None) -> str:
    """The recipe as run (``filled`` maps 'stages.N.key' to the value an ``auto`` resolved to)."""
    d = copy.deepcopy(recipe.to_yaml_dict())
    d["stages"] = [s.model_dump(mode="json", exclude_none=True) for s in recipe.stages]
    for k, v in (filled or {}).items():
        parts = [int(p) if p.isdigit() else p for p in k.split(".")]
        node: Any = d
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = v
    return yaml.safe_dump(d, sort_keys=False)
