"""The package's layer contract, read from the source (AST): imports point down, no cycles.

Layers, top to bottom (a module may import its own layer and the layers below; packages that share
a layer may import each other, as long as no import cycle forms)::

    cli > engine > stages > {quantization, pruning, codebook, distillation, tuning, hpo, training}
        > {state, events, tracking} > {runtime, checkpoint, sources, report, tasks}
        > {config, _utils, errors, _version}

The package root (``__init__``, ``__main__``) and ``testing`` sit above everything: they may import
anything, and nothing may import them. Imports inside functions count; ``if TYPE_CHECKING:`` blocks
do not (they never run).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "compress_cli"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

LAYERS: list[tuple[str, ...]] = [  # bottom first
    ("config", "_utils", "errors", "_version"),
    ("runtime", "checkpoint", "sources", "report", "tasks"),
    ("state", "events", "tracking"),
    ("quantization", "pruning", "codebook", "distillation", "tuning", "hpo", "training"),
    ("stages",),
    ("engine",),
    ("cli",),
    ("__init__", "__main__", "testing"),
]
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}

# what a stage module must not import when it is imported (directly or through the package)
HEAVY = ("torch", "torchvision", "torchao", "torch_pruning", "optuna", "onnx", "onnxruntime", "onnxscript")


@dataclass(frozen=True)
class Import:
    """One import statement's target, where it is, and whether it runs when the module is imported."""

    target: str  # dotted module name (for ``from a import b``: ``a.b`` if that is a module, else ``a``)
    line: int
    module_level: bool


def find_modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` file under the package folder ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = find_modules(ROOT)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module a (possibly relative) ``from ... import`` names."""
    if not node.level:
        return node.module or ""
    is_package = MODULES.get(module, Path()).name == "__init__.py"
    base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str) -> Iterator[Import]:
    """Every import in ``module``'s source, skipping ``if TYPE_CHECKING:`` bodies."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))

    def walk(nodes: list[ast.stmt], module_level: bool) -> Iterator[Import]:
        for node in nodes:
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                yield from walk(node.orelse, module_level)
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield Import(alias.name, node.lineno, module_level)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, node)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    yield Import(sub if sub in MODULES else base, node.lineno, module_level)
            inner = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            for field in ("body", "orelse", "finalbody", "handlers"):
                children = getattr(node, field, None)
                if isinstance(children, list):
                    yield from walk(children, module_level and not inner)
            if isinstance(node, ast.Match):
                for case in node.cases:
                    yield from walk(case.body, module_level)

    yield from walk(tree.body, True)


def layer(module: str) -> str:
    """The layer part of a package module name: ``compress_cli.stages.prune`` -> ``stages``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(ROOT.parent)}:{line}"


def _internal(target: str) -> bool:
    return target == PACKAGE or target.startswith(PACKAGE + ".")


def layer_violations() -> list[str]:
    """``file:line: A (layer) imports B (layer)`` for every import that points up."""
    out: dict[str, None] = {}  # ordered set: ``from x import a, b`` is one edge
    for module in MODULES:
        for imp in imports(module):
            if not _internal(imp.target):
                continue
            src, dst = layer(module), layer(imp.target)
            if RANK[dst] > RANK[src]:
                out[f"{_where(module, imp.line)}: {module} ({src}) imports {imp.target} ({dst})"] = None
    return list(out)


def module_graph() -> dict[str, set[str]]:
    """Module -> package modules it imports when it is imported (module-level imports only)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for imp in imports(module):
            if imp.module_level and imp.target in MODULES and imp.target != module:
                graph[module].add(imp.target)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_through(c, graph) for c in components]


def _cycle_through(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest path from the component's first module back to itself, inside the component."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                return [*paths[v], start]
            if w not in paths:
                paths[w] = [*paths[v], w]
                queue.append(w)
    return component  # unreachable for a strongly connected component


def heavy_imports_at_import_time(module: str, graph: dict[str, set[str]]) -> list[str]:
    """``chain: file:line imports torch`` for each heavy import that importing ``module`` runs
    (through the package modules it imports, and their parent packages' ``__init__``)."""
    out = []
    seen = {module}
    queue = [[module]]
    while queue:
        chain = queue.pop(0)
        for imp in imports(chain[-1]):
            if imp.module_level and imp.target.split(".")[0] in HEAVY:
                via = " -> ".join(chain)
                out.append(f"{via}: {_where(chain[-1], imp.line)} imports {imp.target}")
        parts = chain[-1].split(".")
        parents = {".".join(parts[:n]) for n in range(1, len(parts))}
        for nxt in sorted((graph[chain[-1]] | parents) - seen):
            seen.add(nxt)
            queue.append([*chain, nxt])
    return out


def test_every_module_has_a_layer():
    unknown = sorted({layer(m) for m in MODULES} - set(RANK))
    assert not unknown, f"add these packages/modules to LAYERS in {Path(__file__).name}: {unknown}"


def test_imports_point_down():
    violations = layer_violations()
    assert not violations, "imports that point up a layer:\n" + "\n".join(violations)


def test_no_import_cycles():
    cycles = import_cycles(module_graph())
    assert not cycles, "import cycles (module-level imports):\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_stage_modules_import_no_torch():
    """``compress --help`` and ``compress validate`` import every stage: they must stay light."""
    graph = module_graph()
    stage_modules = [m for m in MODULES if layer(m) == "stages"]
    found = [line for m in stage_modules for line in heavy_imports_at_import_time(m, graph)]
    assert not found, "stage modules import heavy packages when imported:\n" + "\n".join(found)


def test_the_checks_see_what_they_claim(tmp_path, monkeypatch):
    """On a made-up package: function-level imports count, TYPE_CHECKING ones do not, relative
    imports resolve, heavy imports are found through other modules, and a cycle is named."""
    pkg = tmp_path / PACKAGE
    (pkg / "stages").mkdir(parents=True)
    for init in (pkg / "__init__.py", pkg / "stages" / "__init__.py"):
        init.write_text("")
    (pkg / "errors.py").write_text("from compress_cli.stages import a\n")
    (pkg / "stages" / "a.py").write_text(
        "from typing import TYPE_CHECKING\nimport torch\n"
        "if TYPE_CHECKING:\n    from compress_cli import cli\n"
        "def f():\n    from ..engine import run\n"
    )
    (pkg / "stages" / "b.py").write_text("from . import a\nfrom compress_cli import errors\n")
    this = sys.modules[__name__]
    monkeypatch.setattr(this, "ROOT", pkg)
    monkeypatch.setattr(this, "MODULES", find_modules(pkg))
    found = [(i.target, i.module_level) for i in imports("compress_cli.stages.a")]
    assert found == [("typing", True), ("torch", True), ("compress_cli.engine", False)]
    assert layer_violations() == [
        "compress_cli/errors.py:1: compress_cli.errors (errors) imports compress_cli.stages.a (stages)",
        "compress_cli/stages/a.py:6: compress_cli.stages.a (stages) imports compress_cli.engine (engine)",
    ]
    graph = module_graph()
    assert graph["compress_cli.stages.b"] == {"compress_cli.stages.a", "compress_cli.errors"}
    assert import_cycles(graph) == []
    assert heavy_imports_at_import_time("compress_cli.stages.b", graph) == [
        "compress_cli.stages.b -> compress_cli.stages.a: compress_cli/stages/a.py:2 imports torch"
    ]
    (pkg / "stages" / "a.py").write_text("from compress_cli.stages import b\n")
    cycle = ["compress_cli.errors", "compress_cli.stages.a", "compress_cli.stages.b", "compress_cli.errors"]
    assert import_cycles(module_graph()) == [cycle]
    (pkg / "stages" / "__init__.py").write_text("import optuna\n")  # runs before any stage module
    assert heavy_imports_at_import_time("compress_cli.stages.b", module_graph()) == [
        "compress_cli.stages.b -> compress_cli.stages: compress_cli/stages/__init__.py:1 imports optuna"
    ]
