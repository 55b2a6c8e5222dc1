"""Offline English text for the text benchmarks: sentences from the docstrings of Python's own
standard library (it ships with every Python, so the corpus needs no download and is the same for a
given Python version).

- ``unlabelled_{train,test}.jsonl``: sentences from packages not used for the labelled set
  (``{"text": ...}``), split 80/20 the same way;
- ``labelled_{train,test}.jsonl``: sentences labelled by the standard-library package whose
  documentation they come from (email, asyncio, http, logging): a 4-class topic classification task
  (``{"text": ..., "label": ...}``), split 80/20 by a hash of the sentence (stable across runs).

Usage: ``python benchmarks/text_corpus.py OUT_DIR``.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import pkgutil
import re
import sys
from collections.abc import Iterator
from pathlib import Path

LABELLED = ("email", "asyncio", "http", "logging")
UNLABELLED = (
    "importlib", "xml", "unittest", "multiprocessing", "urllib", "wsgiref", "encodings", "concurrent",
    "collections", "json", "ctypes", "curses", "dbm", "html", "zoneinfo",
)  # fmt: skip


def sentences(doc: str | None) -> Iterator[str]:
    """The prose sentences of a docstring (30-300 characters, mostly letters, capitalised)."""
    text = re.sub(r"\s+", " ", doc or "")
    for s in re.split(r"(?<=[.!?])\s+", text):
        if 30 <= len(s) <= 300 and s[0].isupper() and sum(c.isalpha() or c == " " for c in s) > 0.85 * len(s):
            yield s


def package_sentences(name: str) -> list[str]:
    """Every distinct docstring sentence of a standard-library package, its submodules, their
    classes, functions and methods (``__main__`` and test modules are not imported)."""
    root = importlib.import_module(name)
    modules = [root]
    for info in pkgutil.walk_packages(getattr(root, "__path__", []), name + "."):
        if "__main__" in info.name or ".test" in info.name:
            continue
        try:
            modules.append(importlib.import_module(info.name))
        except Exception:  # platform-specific modules (e.g. Windows event loops)
            continue
    seen: dict[str, None] = {}
    for m in modules:
        objs = [m] + [
            v
            for _, v in inspect.getmembers(m)
            if (inspect.isclass(v) or inspect.isfunction(v)) and getattr(v, "__module__", "") == m.__name__
        ]
        for obj in objs:
            docs = [inspect.getdoc(obj)]
            if inspect.isclass(obj):
                docs += [inspect.getdoc(f) for _, f in inspect.getmembers(obj, inspect.isfunction)]
            for d in docs:
                for s in sentences(d):
                    seen.setdefault(s)
    return list(seen)


def _test_split(text: str) -> bool:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % 5 == 0


def write(out: Path) -> dict[str, int]:
    """Write the four JSONL files into ``out``; returns how many lines each has."""
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict[str, object]]] = {
        "unlabelled_train": [],
        "unlabelled_test": [],
        "labelled_train": [],
        "labelled_test": [],
    }
    taken: set[str] = set()
    for label, pkg in enumerate(LABELLED):
        for s in package_sentences(pkg):
            if s not in taken:
                taken.add(s)
                split = "labelled_test" if _test_split(s) else "labelled_train"
                rows[split].append({"text": s, "label": label})
    for pkg in UNLABELLED:
        for s in package_sentences(pkg):
            if s not in taken:
                taken.add(s)
                rows["unlabelled_test" if _test_split(s) else "unlabelled_train"].append({"text": s})
    for name, items in rows.items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for r in items:
                f.write(json.dumps(r) + "\n")
    return {k: len(v) for k, v in rows.items()}


if __name__ == "__main__":
    counts = write(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/text"))
    print(f"Python {sys.version.split()[0]}: {counts} (labels: {', '.join(LABELLED)})")
