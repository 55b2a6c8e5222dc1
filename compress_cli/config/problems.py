"""Pydantic validation errors -> one located line per problem: ``FILE:LINE: path: rule (got value)``.

Unknown keys suggest the nearest allowed key (or list them); errors of the branches of one union
(``lr: float | 'auto'``) are merged into one line; pydantic's wording is shortened to "must ...".
"""

from __future__ import annotations

import difflib
import re
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

if TYPE_CHECKING:
    from compress_cli.config.yaml import RawRecipe

# pydantic's names for the branches of a union in an error location (``function-after[...]``,
# ``float``, ``constrained-float`` (a bounded branch), ``literal['auto']``, ``ModelConfig`` ...):
# dropped so the path is the user's
_UNION_BRANCH = re.compile(
    r"^(function-.*|constrained-\w+|float|int|str|bool|none|dict\[.*\]|list\[.*\]|literal\[.*\]|[A-Z]\w*Config)$"
)


def user_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """A pydantic error location without the names of union branches: the path the user wrote."""
    return tuple(x for x in loc if not (isinstance(x, str) and _UNION_BRANCH.match(x)))


def fmt_value(v: Any) -> str:
    """``repr(v)``, cut to 60 characters."""
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def fmt_path(path: tuple[Any, ...], stage_types: dict[int, str]) -> str:
    """``stages[2] (quantize).scheme`` for ``('stages', 2, 'scheme')``; ``(top level)`` for ``()``."""
    out = ""
    for i, p in enumerate(path):
        if isinstance(p, int):
            out += f"[{p}]"
            if i == 1 and path[0] == "stages" and p in stage_types:
                out += f" ({stage_types[p]})"
        else:
            out += ("." if out else "") + str(p)
    return out or "(top level)"


def pydantic_problems(
    err: ValidationError,
    raw: RawRecipe,
    prefix: tuple[Any, ...],
    model: type[BaseModel],
    stage_types: dict[int, str],
) -> list[str]:
    """One line per problem in ``err``, raised by ``model`` validating the value at ``prefix``.

    ``stage_types`` maps a stage index to its type, so paths read ``stages[0] (finetune).epochs``.
    """
    problems = []
    merged: dict[str, list[str]] = {}  # union branches: one line per path, alternatives joined
    for e in err.errors():
        loc = user_loc(tuple(e["loc"]))
        path = prefix + loc
        kind = e["type"]
        if kind == "extra_forbidden" and loc:
            fields = _fields_at(model, loc[:-1])
            hint = difflib.get_close_matches(str(loc[-1]), fields, n=1, cutoff=0.5)
            rule = "unknown key" + (
                f" (did you mean {hint[0]!r}?)" if hint else f" (allowed: {', '.join(fields)})"
            )
            problems.append(f"{raw.where(path)}: {fmt_path(path, stage_types)}: {rule}")
            continue
        if kind == "missing":
            problems.append(f"{raw.where(path)}: {fmt_path(path, stage_types)}: required key is missing")
            continue
        msg = e["msg"]
        if kind == "literal_error":
            allowed = e.get("ctx", {}).get("expected", "")
            msg = f"must be one of {allowed.replace(' or ', ', ')}"
        else:
            msg = re.sub(
                r"\b(Input|List|String|Dictionary|Tuple|Set) should ",
                "must ",
                msg.replace("Value error, ", ""),
            )
        line = f"{raw.where(path)}: {fmt_path(path, stage_types)}: "
        if line in merged:
            merged[line].append(msg.replace("must be ", "", 1))
            continue
        merged[line] = [msg, f" (got {fmt_value(e.get('input'))})"]
        problems.append(line)
    return [
        p + " or ".join(merged[p][:1] + merged[p][2:]) + merged[p][1] if p in merged else p for p in problems
    ]


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the (nested) model at ``loc`` inside ``model``; [] if not a model."""
    m: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        f = getattr(m, "model_fields", {}).get(part)
        if f is None:
            return []
        ann = f.annotation
        cand = [
            a
            for a in (ann, *getattr(ann, "__args__", ()))
            if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if not cand:
            return []
        m = cand[0]
    return list(getattr(m, "model_fields", {}))
