"""Recipes are bounded input: alias bombs, recursive aliases, deep nesting and oversized files are
refused with one located line, fast and in little memory; every numeric field has bounds."""

from __future__ import annotations

import time
import tracemalloc
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types as at
import pytest
from pydantic import BaseModel, Field
from pydantic.fields import FieldInfo
from typer.testing import CliRunner

from compress_cli.cli import app
from compress_cli.config.recipe import Recipe
from compress_cli.config.yaml import MAX_ALIAS_NODES, MAX_RECIPE_BYTES, apply_overrides, parse_yaml
from compress_cli.errors import RecipeError
from compress_cli.stages.registry import get_stage, list_stages, load_recipe, validate

HEAD = "version: 1\nname: lol\nmodel: {source: zoo:digits_mlp}\n"


def _bomb(levels: int = 9) -> str:
    """The "billion laughs" shape: ``levels`` lists of 10 aliases to the list before (10**levels)."""
    names = "abcdefghijklmnop"
    lines = [f"{names[0]}: &{names[0]} [{', '.join(['lol'] * 10)}]"]
    for prev, cur in zip(names[: levels - 1], names[1:levels], strict=True):
        lines.append(f"{cur}: &{cur} [{', '.join([f'*{prev}'] * 10)}]")
    return HEAD + "\n".join(lines) + "\n"


def test_billion_laughs_is_refused_fast_in_little_memory(tmp_path):
    p = tmp_path / "bomb.yaml"
    p.write_text(_bomb())
    assert len(p.read_bytes()) < 1024
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(
            RecipeError, match=r"bomb\.yaml:7: alias \*c: aliases expand to more than 10000 nodes"
        ):
            load_recipe(p)
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seconds < 2.0
    assert peak < 20 << 20  # bytes; the unbounded loader grew past 10 GB


def test_billion_laughs_through_the_cli_is_one_line_exit_2(tmp_path):
    p = tmp_path / "recipe.yaml"
    p.write_text(_bomb())
    r = CliRunner().invoke(app, ["validate", str(p)])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "recipe.yaml:7: alias *c" in lines[0], r.output
    assert "Traceback" not in r.output


def test_alias_expansion_budget_is_a_sum_over_all_aliases():
    # each alias alone is small, together they pass the budget
    refs = ", ".join(["*a"] * (MAX_ALIAS_NODES // 11 + 1))
    with pytest.raises(RecipeError, match=r"r\.yaml:5: alias \*a: aliases expand to more than"):
        parse_yaml(HEAD + f"a: &a [{', '.join(['x'] * 10)}]\nb: [{refs}]\n", "r.yaml")


def test_aliases_to_a_long_string_count_its_length():
    long = "x" * 200_000  # one node, but 200 KB every time it is repeated
    with pytest.raises(RecipeError, match=r"r\.yaml:5: alias \*s: aliases expand to more than"):
        parse_yaml(HEAD + f"s: &s {long}\nb: [{', '.join(['*s'] * 10)}]\n", "r.yaml")


def test_recursive_alias_is_refused_located():
    with pytest.raises(RecipeError, match=r"r\.yaml:5: alias \*a is inside its own anchor \(recursive\)"):
        parse_yaml(HEAD + "a: &a\n  - *a\n", "r.yaml")


def test_deep_nesting_is_refused_not_a_recursion_error():
    text = HEAD + "a: " + "[" * 5000 + "]" * 5000 + "\n"
    with pytest.raises(RecipeError, match=r"r\.yaml:4: nested deeper than 100 levels"):
        parse_yaml(text, "r.yaml")


def test_oversized_recipe_file_is_refused_with_the_line_of_the_limit(tmp_path):
    p = tmp_path / "big.yaml"
    body = "# padding padding padding padding padding padding padding padding padding\n"
    n = MAX_RECIPE_BYTES // len(body) + 10
    p.write_text(HEAD + body * n)
    line = (HEAD + body * n).encode()[:MAX_RECIPE_BYTES].count(b"\n") + 1
    t0 = time.perf_counter()
    with pytest.raises(RecipeError, match=rf"big\.yaml:{line}: recipe is larger than 1 MiB"):
        load_recipe(p)
    assert time.perf_counter() - t0 < 2.0
    with pytest.raises(RecipeError, match=rf"t\.yaml:{line}: recipe is larger than 1 MiB"):
        parse_yaml(HEAD + body * n, "t.yaml")
    p.write_text(HEAD + body * (n - 30))  # just under the limit: parsed as usual
    assert load_recipe(p)[0].name == "lol"


def test_plain_anchors_aliases_and_merge_keys_still_work(tmp_path):
    p = tmp_path / "shared.yaml"
    p.write_text(
        HEAD
        + "data: {limit_train: 64, limit_test: 64}\n"
        + "measure: {latency: null}\n"
        + "stages:\n"
        + "  - &ft {type: finetune, epochs: 1, lr: 0.01}\n"
        + "  - {<<: *ft, name: again, epochs: 2}\n"
        + "  - {type: prune, sparsity: 0.5, include: &mods ['fc1', 'fc2']}\n"
        + "  - {type: prune, sparsity: 0.6, include: *mods}\n"
    )
    r, raw = load_recipe(p)
    assert [s.type for s in r.stages] == ["finetune", "finetune", "prune", "prune"]
    assert r.stages[1].epochs == 2 and r.stages[1].lr == 0.01 and r.stages[1].name == "again"
    assert list(r.stages[3].include) == ["fc1", "fc2"]
    assert raw.where(("stages", 3, "sparsity")) == f"{p}:10"
    assert raw.where(("stages", 1, "lr")) == f"{p}:8"  # a merged key: located at its mapping


def test_set_override_values_go_through_the_same_bounds():
    raw = parse_yaml(HEAD, "r.yaml")
    bomb = (
        "[&a [1,1,1,1,1,1,1,1,1,1], "
        + ", ".join(
            f"&{c} [{', '.join([f'*{p}'] * 10)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
        )
        + "]"
    )
    with pytest.raises(RecipeError, match=r"--set extra=\[&a .*: alias \*c: aliases expand to more than"):
        apply_overrides(raw, [f"extra={bomb}"])
    raw = parse_yaml(HEAD, "r.yaml")
    apply_overrides(raw, ["stages=[&e {type: evaluate}, *e]"])
    assert [s.type for s in validate(raw).stages] == ["evaluate", "evaluate"]


# --- bounds on every numeric field --------------------------------------------------------------

#: "Model.field" -> why that field has no lower and upper bound of its own (reviewed, not a todo list)
UNBOUNDED_OK = {
    # hpo search dimensions: the range ends and the choices are values of a wrapped stage's field,
    # and the hpo stage validates every one of them through that field (Distribution.probe_values),
    # so they carry the wrapped field's bounds
    "Distribution.float_": "checked against the wrapped stage field's bounds",
    "Distribution.int_": "checked against the wrapped stage field's bounds",
    "Distribution.categorical": "checked against the wrapped stage field's bounds",
    # a grid step is bounded by its range: Distribution refuses a step larger than hi - lo
    "Distribution.step": "at most hi - lo, checked by Distribution's validator",
}


def _bounds(meta: list[Any]) -> tuple[bool, bool]:
    """(has a lower bound, has an upper bound) among pydantic/annotated-types constraints."""
    lo = hi = False
    for m in meta:
        if isinstance(m, FieldInfo):
            sub = _bounds(list(m.metadata))
            lo, hi = lo or sub[0], hi or sub[1]
        lo = lo or isinstance(m, (at.Ge, at.Gt)) or (isinstance(m, at.Interval) and m.ge is not None)
        hi = hi or isinstance(m, (at.Le, at.Lt))
    return lo, hi


def _numeric_leaves(ann: Any, meta: list[Any], models: list[type[BaseModel]]) -> list[tuple[bool, bool]]:
    """The bounds of every int/float a value of type ``ann`` can hold; nested models go to ``models``.

    ``meta`` (the field's constraints) applies through Optional/unions, not into containers.
    """
    origin = get_origin(ann)
    if origin is Annotated:
        inner, *extra = get_args(ann)
        return _numeric_leaves(inner, meta + extra, models)
    if origin in (Union, types.UnionType):
        return [b for a in get_args(ann) for b in _numeric_leaves(a, meta, models)]
    if origin is Literal or ann in (type(None), bool, str, Any):
        return []
    if ann in (int, float):
        return [_bounds(meta)]
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        models.append(ann)
        return []
    if origin is not None:  # list[...], tuple[...], dict[str, ...], SerializeAsAny[...]: elements
        return [b for a in get_args(ann) if a is not Ellipsis for b in _numeric_leaves(a, [], models)]
    return []


def _walk_numeric_fields() -> tuple[dict[str, str], set[str]]:
    """Every model a recipe can hold (top level and every registered stage's config, recursively):
    ("Model.field" -> what is missing) for numeric fields without both bounds, and every field seen."""
    todo: list[type[BaseModel]] = [Recipe] + [get_stage(t).config_class for t in list_stages()]
    seen_models: set[type[BaseModel]] = set()
    missing: dict[str, str] = {}
    fields: set[str] = set()
    while todo:
        model = todo.pop()
        if model in seen_models:
            continue
        seen_models.add(model)
        for name, f in model.model_fields.items():
            key = f"{model.__name__}.{name}"
            fields.add(key)
            for lo, hi in _numeric_leaves(f.annotation, list(f.metadata), todo):
                if not (lo and hi):
                    missing[key] = "no " + " and no ".join(
                        w for w, ok in (("lower bound", lo), ("upper bound", hi)) if not ok
                    )
    return missing, fields


def test_every_numeric_recipe_field_has_a_lower_and_an_upper_bound():
    missing, fields = _walk_numeric_fields()
    assert {"FinetuneConfig.lr", "Recipe.seed", "LatencyConfig.batch_sizes", "FeaturePair.weight"} <= fields
    unexplained = {k: v for k, v in missing.items() if k not in UNBOUNDED_OK}
    assert not unexplained, "numeric recipe fields without bounds:\n" + "\n".join(
        f"  {k}: {v}" for k, v in sorted(unexplained.items())
    )
    assert not set(UNBOUNDED_OK) - set(missing), "UNBOUNDED_OK lists fields that are bounded or gone"


def test_the_walker_sees_a_missing_bound():
    # the walker itself: an unbounded float, Optional int, lr-style union and list element are caught
    class Probe(BaseModel):
        a: float = Field(0.0, ge=0)
        b: int | None = Field(None, le=3)
        c: float | Literal["auto"] = 0.1
        d: list[int] = Field(default_factory=list)
        e: Annotated[float, Field(gt=0, le=1)] | Literal["auto"] = 0.5
        f: list[Annotated[int, Field(ge=0, lt=9)]] = Field(default_factory=list)

    leaves = {n: _numeric_leaves(f.annotation, list(f.metadata), []) for n, f in Probe.model_fields.items()}
    assert leaves == {
        "a": [(True, False)],
        "b": [(False, True)],
        "c": [(False, False)],
        "d": [(False, False)],
        "e": [(True, True)],
        "f": [(True, True)],
    }


@pytest.mark.parametrize(
    ("stage", "pattern"),
    [
        (
            "lr: -1",
            r"r\.yaml:6: stages\[0\] \(finetune\)\.lr: must be greater than 0 or one of 'auto' \(got -1\)",
        ),
        ("lr: 1000", r"r\.yaml:6: stages\[0\] \(finetune\)\.lr: must be less than or equal to 10"),
        ("epochs: 100001", r"r\.yaml:6: stages\[0\] \(finetune\)\.epochs: must be less than or equal to"),
        (
            "batch_size: 0",
            r"r\.yaml:6: stages\[0\] \(finetune\)\.batch_size: must be greater than or equal to 1",
        ),
        ("milestones: [0]", r"r\.yaml:6: stages\[0\] \(finetune\)\.milestones\[0\]: must be greater than or"),
        ("weight_decay: .inf", r"r\.yaml:6: stages\[0\] \(finetune\)\.weight_decay: must be less than or"),
    ],
)
def test_out_of_range_stage_values_are_refused_with_a_located_line(stage, pattern):
    with pytest.raises(RecipeError, match=pattern):
        validate(parse_yaml(HEAD + "stages:\n  - type: finetune\n    " + stage + "\n", "r.yaml"))


def test_out_of_range_top_level_values_are_refused_with_a_located_line():
    with pytest.raises(RecipeError, match=r"r\.yaml:4: seed: must be greater than or equal to 0 \(got -1\)"):
        validate(parse_yaml(HEAD + "seed: -1\n", "r.yaml"))
    with pytest.raises(
        RecipeError, match=r"r\.yaml:5: data\.batch_size: must be less than or equal to 1048576"
    ):
        validate(parse_yaml(HEAD + "data:\n  batch_size: 1048577\n", "r.yaml"))
    with pytest.raises(RecipeError, match=r"--set measure\.latency\.batch_sizes=\[1, 0\]: measure\.latency"):
        check = parse_yaml(HEAD, "r.yaml")
        apply_overrides(check, ["measure.latency.batch_sizes=[1, 0]"])
        validate(check)


@pytest.mark.parametrize(
    ("dimension", "pattern"),
    [
        # the allow-listed range ends carry the wrapped field's bounds (lr <= 10)
        (
            "{float: [0.001, 100]}",
            r"r\.yaml:8: .*space\.finetune\.lr: value 100\.0 is not valid for finetune\.lr: must be less",
        ),
        (
            "{float: [0.001, 0.1], step: 0.5}",
            r"r\.yaml:8: .*space\.finetune\.lr: step must be at most hi - lo",
        ),
    ],
)
def test_hpo_search_dimensions_are_bounded_too(dimension, pattern):
    text = (
        HEAD
        + "stages:\n  - type: hpo\n    stages: [{type: finetune, epochs: 1}]\n    space:\n"
        + f"      finetune.lr: {dimension}\n"
    )
    with pytest.raises(RecipeError, match=pattern):
        validate(parse_yaml(text, "r.yaml"))
