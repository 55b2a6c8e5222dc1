"""Recipes are bounded input: alias bombs, recursive aliases, deep nesting and oversized files are
refused with one located line, fast and in little memory; every numeric field has bounds."""

from __future__ import annotations

import time
import tracemalloc

import pytest
from typer.testing import CliRunner

from compress_cli.cli import app
from compress_cli.config.yaml import MAX_ALIAS_NODES, MAX_RECIPE_BYTES, apply_overrides, parse_yaml
from compress_cli.errors import RecipeError
from compress_cli.stages.registry import load_recipe, validate

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
