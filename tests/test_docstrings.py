"""Every public module, class and function of the package says what it does (issue 14).

A public method may rely on the docstring of the method it overrides in one of the package's own
base classes (``Stage.run``, ``SchemeHandler.convert``, ``RunListener.on_message`` ...), matched by
name through the class's bases; private names (``_x``) and dunders are exempt.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "compress_cli"


def _classes() -> dict[str, ast.ClassDef]:
    found: dict[str, ast.ClassDef] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                found.setdefault(node.name, node)
    return found


def _base_names(cls: ast.ClassDef) -> list[str]:
    names = []
    for b in cls.bases:
        b = b.value if isinstance(b, ast.Subscript) else b  # Stage[FinetuneConfig]
        if isinstance(b, ast.Name):
            names.append(b.id)
        elif isinstance(b, ast.Attribute):
            names.append(b.attr)
    return names


def _documented_in_bases(cls: ast.ClassDef, method: str, classes: dict[str, ast.ClassDef]) -> bool:
    todo, seen = _base_names(cls), set()
    while todo:
        name = todo.pop()
        base = classes.get(name)
        if base is None or name in seen:
            continue
        seen.add(name)
        for n in base.body:
            is_method = isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == method
            if is_method and ast.get_docstring(n):
                return True
        todo.extend(_base_names(base))
    return False


def missing_docstrings() -> list[str]:
    classes = _classes()
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent)
        tree = ast.parse(path.read_text())
        if path.name != "__main__.py" and not ast.get_docstring(tree):
            missing.append(f"{rel}:1: module")
        for node in tree.body:
            is_def = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            if is_def and not node.name.startswith("_") and not ast.get_docstring(node):
                missing.append(f"{rel}:{node.lineno}: {node.name}")
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                for m in node.body:
                    if not isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)) or m.name.startswith("_"):
                        continue
                    if not ast.get_docstring(m) and not _documented_in_bases(node, m.name, classes):
                        missing.append(f"{rel}:{m.lineno}: {node.name}.{m.name}")
    return missing


def test_every_public_module_class_and_function_has_a_docstring():
    missing = missing_docstrings()
    assert not missing, f"{len(missing)} without a docstring:\n" + "\n".join(missing)
