"""Recipe YAML in and out: parsing with a line number for every key path, ``extends:`` composition,
and ``--set`` overrides.

Problems name ``FILE:LINE`` (or the ``--set key=value`` that put a value there), so every
validation message points at what the user has to edit; in a composed recipe that is the file
that holds the key.

``extends: base.yaml`` (or a list, relative to the recipe's folder; later ones win) starts from the
named recipes, deep-merged: mappings merge key by key, any other value (lists included) replaces,
``stages`` too; ``KEY+:`` appends to the list ``KEY`` instead (``stages+:`` adds stages after the
base's). Bases may extend others; a cycle is refused.

A recipe is bounded input: a file over :data:`MAX_RECIPE_BYTES`, aliases that expand to more than
:data:`MAX_ALIAS_NODES` nodes (the "billion laughs" shape), an alias inside its own anchor and nesting
deeper than :data:`MAX_DEPTH` are refused while composing, before anything is built from them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from compress_cli.errors import RecipeError

if TYPE_CHECKING:
    from compress_cli.config.recipe import Recipe


#: the largest recipe file (or text) parsed, in bytes: a recipe is a few KB
MAX_RECIPE_BYTES = 1 << 20
#: the most nodes all aliases of one document may expand to, together (a scalar weighs one node per
#: :data:`_CHARS_PER_NODE` characters, so an alias to a long string is not free either)
MAX_ALIAS_NODES = 10_000
#: the deepest nesting of collections (the composer recurses: far deeper would overflow the stack)
MAX_DEPTH = 100
_CHARS_PER_NODE = 80


class _BoundError(Exception):
    """A recipe past one of the bounds: reported as ``FILE:LINE: problem``, not as a syntax error."""

    def __init__(self, problem: str, mark: Any) -> None:
        super().__init__(problem)
        self.problem = problem
        self.line: int | None = mark.line + 1 if mark is not None else None


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that keeps count, while composing, of what aliases expand to and of the nesting."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._weight: dict[yaml.Node, int] = {}  # a composed node -> its node count, aliases expanded
        self._alias_nodes = 0
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        """Compose one node, refusing it (at its mark) when it breaks a bound."""
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            target = self.anchors.get(event.anchor)
            if target is not None:  # an undefined alias is the composer's own error
                weight = self._weight.get(target)
                if weight is None:
                    raise _BoundError(
                        f"alias *{event.anchor} is inside its own anchor (recursive)",
                        event.start_mark,
                    )
                self._alias_nodes += weight
                if self._alias_nodes > MAX_ALIAS_NODES:
                    raise _BoundError(
                        f"alias *{event.anchor}: aliases expand to more than {MAX_ALIAS_NODES} nodes "
                        "(nested aliases, the 'billion laughs' shape); a recipe needs far fewer",
                        event.start_mark,
                    )
            return super().compose_node(parent, index)
        if self._depth >= MAX_DEPTH:
            raise _BoundError(f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if node is None:
            return None
        if isinstance(node, yaml.MappingNode):
            weight = 1 + sum(self._weight[k] + self._weight[v] for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            weight = 1 + sum(self._weight[v] for v in node.value)
        else:
            weight = 1 + len(str(node.value)) // _CHARS_PER_NODE
        self._weight[node] = weight
        return node


def _too_large(data: bytes) -> int | None:
    """The line the size limit falls on, or None when ``data`` is within :data:`MAX_RECIPE_BYTES`."""
    return data.count(b"\n", 0, MAX_RECIPE_BYTES) + 1 if len(data) > MAX_RECIPE_BYTES else None


def _size_problem(line: int) -> str:
    """``LINE: problem`` for a recipe over the size limit (the limit falls on ``line``)."""
    mib = MAX_RECIPE_BYTES >> 20
    return f"{line}: recipe is larger than {mib} MiB (a recipe is a few KB: is this the right file?)"


def _load(text: str) -> tuple[Any, dict[tuple[Any, ...], int]]:
    """(Python data, key path -> line) of one YAML document, composed once within the bounds.

    The lines are read before the data is built: building resolves merge keys (``<<: *base``) in
    the nodes, and a merged key is located at its mapping, as it always was.
    """
    loader = _LineLoader(text)
    lines: dict[tuple[Any, ...], int] = {}
    try:
        node = loader.get_single_node()
        if node is None:
            return None, lines
        _lines(node, (), lines)
        return loader.construct_document(node), lines
    finally:
        loader.dispose()


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

    def __init__(
        self,
        data: Any,
        lines: dict[tuple[Any, ...], int],
        filename: str,
        files: dict[tuple[Any, ...], str] | None = None,
    ):
        self.data = data
        self.lines = lines
        self.filename = filename
        #: key path -> the file that holds it, where that is not ``filename`` (from an ``extends:`` base)
        self.files = files or {}
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
        filename = self.files.get(p, self.filename)
        return f"{filename}:{line}" if line else filename


def parse_yaml(text: str, filename: str = "<recipe>") -> RawRecipe:
    """Parse recipe text; a syntax error or a broken bound raises one located :class:`RecipeError`."""
    line_over = _too_large(text.encode("utf-8", "replace")) if len(text) * 4 > MAX_RECIPE_BYTES else None
    if line_over is not None:
        raise RecipeError(f"{filename}:{_size_problem(line_over)}")
    try:
        data, lines = _load(text)
    except _BoundError as e:
        raise RecipeError(f"{filename}{f':{e.line}' if e.line else ''}: {e.problem}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark else ""
        ctx = ""
        if e.context and e.context_mark and e.problem_mark and e.context_mark.line != e.problem_mark.line:
            ctx = f" ({e.context.replace('while parsing', 'in')} started at line {e.context_mark.line + 1})"
        raise RecipeError(f"{filename}{line}: YAML syntax error: {e.problem or e}{ctx}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{filename}: YAML error: {e}") from None
    return RawRecipe(data, lines, filename)


def read_recipe_file(path: str | Path) -> RawRecipe:
    """Read and parse a recipe file, composing its ``extends:`` bases; an unreadable path, a missing
    base or a cycle raises :class:`RecipeError`."""
    return _compose(Path(path), ())


#: where each key path comes from in a composed recipe: path -> (file, line)
_Located = dict[tuple[Any, ...], tuple[str, int]]


def _compose(path: Path, chain: tuple[Path, ...]) -> RawRecipe:
    """``path`` parsed, over its ``extends:`` bases merged in order (``chain``: the files that
    extend it, to refuse a cycle)."""
    raw = _read_one(path)
    if not isinstance(raw.data, dict):
        return raw
    own = {p: (raw.filename, line) for p, line in raw.lines.items()}
    data: dict[str, Any] = {}
    located: _Located = {(): (raw.filename, raw.lines.get((), 1))}
    bases = raw.data.pop("extends", None)
    if "extends" in raw.lines or bases is not None:
        where = raw.where(("extends",))
        names = [bases] if isinstance(bases, str) else bases
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            raise RecipeError(f"{where}: extends: must be a recipe file or a list of them (got {bases!r})")
        me = path.resolve()
        for name in names:
            base = path.parent / name
            if base.resolve() in (*chain, me):
                cycle = " -> ".join(str(p) for p in (*chain, me, base.resolve()))
                raise RecipeError(
                    f"{where}: extends: {name}: a cycle ({cycle}); a recipe cannot extend itself"
                )
            if not base.is_file():
                raise RecipeError(
                    f"{where}: extends: {name}: recipe file not found (relative to {path.parent or '.'})"
                )
            braw = _compose(base, (*chain, me))
            if not isinstance(braw.data, dict):
                raise RecipeError(f"{braw.filename}:1: extends: a base recipe must be a mapping of keys")
            blocated = {p: (braw.files.get(p, braw.filename), line) for p, line in braw.lines.items()}
            _merge(data, located, braw.data, blocated, ())
        own.pop(("extends",), None)
    _merge(data, located, raw.data, own, ())
    lines = {p: line for p, (_, line) in located.items()}
    files = {p: f for p, (f, _) in located.items() if f != raw.filename}
    return RawRecipe(data, lines, raw.filename, files)


def _merge(
    base: dict[Any, Any], located: _Located, over: dict[Any, Any], olocated: _Located, at: tuple[Any, ...]
) -> None:
    """Merge ``over`` into ``base`` (and where its keys come from into ``located``): mappings key by
    key, anything else replaces, ``KEY+`` appends to the list ``KEY``."""

    def moved(src: tuple[Any, ...], dst: tuple[Any, ...], shift: int = 0) -> None:
        n = len(src)
        for p, loc in olocated.items():
            if p[:n] == src:
                rest = p[n:]
                if shift and rest:
                    rest = (rest[0] + shift, *rest[1:])
                located[dst + rest] = loc

    def loc(p: tuple[Any, ...]) -> tuple[str, int]:  # a key from a merge key (<<) has no line of its own
        while p not in olocated and p:
            p = p[:-1]
        return olocated.get(p, ("<recipe>", 1))

    def dropped(prefix: tuple[Any, ...]) -> None:
        for p in [p for p in located if p[: len(prefix)] == prefix]:
            del located[p]

    for k, v in over.items():
        if isinstance(k, str) and len(k) > 1 and k.endswith("+"):
            key = k[:-1]
            old = base.get(key, [])
            if not isinstance(v, list) or not isinstance(old, list):
                where = "{}:{}".format(*loc((*at, k)))
                what = "the value" if not isinstance(v, list) else f"the base's {key}"
                raise RecipeError(
                    f"{where}: {'.'.join(map(str, (*at, k)))}: appends to a list, but {what} is not a list"
                )
            base[key] = [*old, *v]
            here, there = at + (k,), at + (key,)
            moved(here, there, shift=len(old))
            if there not in located or not old:
                located[there] = loc(here)
        elif isinstance(v, dict) and isinstance(base.get(k), dict):
            here = at + (k,)
            located[here] = loc(here)
            _merge(base[k], located, v, olocated, here)
        else:
            here = at + (k,)
            base[k] = v
            dropped(here)
            moved(here, here)
            if here not in located:
                located[here] = loc(here)


def _read_one(path: Path) -> RawRecipe:
    """Read and parse one recipe file, as written (``extends:`` not resolved)."""
    p = path
    try:
        with p.open("rb") as f:
            head = f.read(MAX_RECIPE_BYTES + 1)  # never more: a huge file is refused unread
        line_over = _too_large(head)
        if line_over is not None:
            raise RecipeError(f"{p}:{_size_problem(line_over)}")
        text = head.decode("utf-8")
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
            value = _load(text)[0] if text.strip() else None
        except _BoundError as e:
            raise RecipeError(f"--set {item}: {e.problem}") from None
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
