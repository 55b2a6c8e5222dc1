"""``extends:`` recipe composition: deep merge, lists and stages replaced, ``stages+:`` appends,
problems located in the file that holds the key, cycles refused, ``validate --show``."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from compress_cli.cli import app
from compress_cli.config.yaml import read_recipe_file
from compress_cli.errors import RecipeError
from compress_cli.stages.registry import load_recipe

BASE = """\
version: 1
name: base
device: cpu
model: {source: "zoo:digits_mlp"}
data:
  source: digits
  batch_size: 32
  limit_train: 200
measure:
  latency: {batch_sizes: [1, 32], warmup: 1, iterations: 3}
stages:
  - {type: prune, sparsity: 0.5}
  - {type: finetune, epochs: 1}
"""


def _write(tmp_path: Path, **files: str) -> None:
    for name, text in files.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_deep_merge_lists_replaced_stages_replaced_or_appended(tmp_path):
    _write(
        tmp_path,
        **{
            "bases/base.yaml": BASE,
            "replace.yaml": "extends: bases/base.yaml\nname: v1\ndata: {batch_size: 16}\n"
            "measure: {latency: {batch_sizes: [1]}}\nstages:\n  - {type: evaluate}\n",
            "append.yaml": "extends: [bases/base.yaml]\nname: v2\nstages+:\n  - {type: evaluate}\n",
        },
    )
    r, _ = load_recipe(tmp_path / "replace.yaml")
    assert r.name == "v1" and r.device == "cpu"
    assert (r.data.batch_size, r.data.limit_train) == (16, 200)  # merged key by key
    assert r.measure.latency is not None and r.measure.latency.batch_sizes == [1]  # a list replaces
    assert r.measure.latency.iterations == 3
    assert [s.type for s in r.stages] == ["evaluate"]
    r, _ = load_recipe(tmp_path / "append.yaml")
    assert [s.type for s in r.stages] == ["prune", "finetune", "evaluate"]


def test_later_bases_win_and_bases_may_extend_others(tmp_path):
    _write(
        tmp_path,
        **{
            "base.yaml": BASE,
            "cuda.yaml": "extends: base.yaml\ndevice: auto\nseed: 3\n",
            "seed.yaml": "seed: 7\n",
            "r.yaml": "extends: [cuda.yaml, seed.yaml]\nname: r\n",
        },
    )
    r, _ = load_recipe(tmp_path / "r.yaml")
    assert (r.device, r.seed, r.name, len(r.stages)) == ("auto", 7, "r", 2)


def test_problems_are_located_in_the_file_that_holds_the_key(tmp_path):
    bad_base = BASE.replace("batch_size: 32", "batch_size: -1")
    _write(
        tmp_path,
        **{
            "base.yaml": bad_base,
            "r.yaml": "extends: base.yaml\nname: r\nseed: -2\nstages+:\n  - {type: evaluate}\n"
            "  - {type: prune, sparsity: 3}\n",
        },
    )
    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path / "r.yaml")
    text = str(e.value)
    line = bad_base.splitlines().index("  batch_size: -1") + 1
    assert f"{tmp_path / 'base.yaml'}:{line}: data.batch_size" in text
    assert f"{tmp_path / 'r.yaml'}:3: seed" in text
    assert f"{tmp_path / 'r.yaml'}:6: stages[3] (prune).sparsity" in text  # the appended stage, in r.yaml


def test_cycles_and_missing_bases_are_refused(tmp_path):
    _write(
        tmp_path,
        **{
            "a.yaml": "extends: b.yaml\nname: a\n",
            "b.yaml": "extends: a.yaml\nname: b\n",
            "self.yaml": "extends: self.yaml\n",
            "gone.yaml": "name: g\nextends: nothere.yaml\n",
            "odd.yaml": "extends: {a: 1}\n",
        },
    )
    with pytest.raises(RecipeError, match=r"b\.yaml:1: extends: a\.yaml: a cycle .*a\.yaml -> .*b\.yaml -> "):
        read_recipe_file(tmp_path / "a.yaml")
    with pytest.raises(RecipeError, match=r"self\.yaml:1: extends: self\.yaml: a cycle"):
        read_recipe_file(tmp_path / "self.yaml")
    with pytest.raises(RecipeError, match=r"gone\.yaml:2: extends: nothere\.yaml: recipe file not found"):
        read_recipe_file(tmp_path / "gone.yaml")
    with pytest.raises(RecipeError, match=r"odd\.yaml:1: extends: must be a recipe file or a list"):
        read_recipe_file(tmp_path / "odd.yaml")


def test_validate_show_prints_the_merged_recipe(tmp_path):
    child = "extends: base.yaml\nname: r\nstages+: [{type: evaluate}]\n"
    _write(tmp_path, **{"base.yaml": BASE, "r.yaml": child})
    res = CliRunner().invoke(app, ["validate", str(tmp_path / "r.yaml"), "--show", "--set", "seed=5"])
    assert res.exit_code == 0, res.output
    merged = yaml.safe_load(res.stdout)
    assert merged["name"] == "r" and merged["seed"] == 5 and "extends" not in merged
    assert [s["type"] for s in merged["stages"]] == ["prune", "finetune", "evaluate"]
    assert merged["data"]["limit_train"] == 200


def test_shipped_variants_extend_the_fashion_base():
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    base, _ = load_recipe(recipes / "base_fashion.yaml")
    appended, _ = load_recipe(recipes / "fashion_pruned_ort.yaml")
    replaced, _ = load_recipe(recipes / "fashion_int8_ort.yaml")
    assert [s.type for s in appended.stages] == [s.type for s in base.stages] + ["quantize"]
    assert [s.type for s in replaced.stages] == ["quantize"] and replaced.data.calibration_batches == 16
    assert replaced.model == base.model and replaced.measure == base.measure


def test_json_schema_knows_extends_and_lets_a_variant_leave_out_required_keys():
    from compress_cli.stages.registry import json_schema

    s = json_schema()
    assert {"extends", "stages+"} <= set(s["properties"])
    assert s["properties"]["stages+"]["items"] == s["properties"]["stages"]["items"]
    assert "required" not in s and s["if"] == {"required": ["extends"]}
    assert {"name", "model"} <= set(s["else"]["required"])
