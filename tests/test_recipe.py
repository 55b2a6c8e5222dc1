from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from compress_cli.config.yaml import apply_overrides, parse_yaml
from compress_cli.errors import RecipeError
from compress_cli.stages.registry import json_schema, load_recipe, validate

REPO = Path(__file__).resolve().parents[1]

GOOD = """\
version: 1
name: demo
model:
  source: zoo:digits_mlp
stages:
  - type: finetune
    epochs: 1
  - type: evaluate
"""


def check(text: str, *overrides: str):
    raw = parse_yaml(text, "r.yaml")
    apply_overrides(raw, list(overrides))
    return validate(raw)


def test_valid_recipe_defaults():
    r = check(GOOD)
    assert r.name == "demo" and r.device == "auto" and r.seed == 0
    assert [s.type for s in r.stages] == ["finetune", "evaluate"]
    assert r.data.source == "digits"
    assert str(r.output_dir()) == "runs/demo"


def test_unknown_top_level_key_names_line_and_suggests():
    with pytest.raises(RecipeError, match=r"r\.yaml:5: modle: unknown key \(did you mean 'model'\?\)"):
        check(GOOD.replace("model:\n  source: zoo:digits_mlp", "model:\n  source: zoo:digits_mlp\nmodle: 1"))


def test_unknown_stage_type_suggests_nearest():
    with pytest.raises(
        RecipeError,
        match=r"r\.yaml:6: stages\[0\]\.type: unknown stage type 'finetun' \(did you mean 'finetune'\?\)",
    ):
        check(GOOD.replace("type: finetune", "type: finetun"))


def test_stage_key_typo_is_located_and_named():
    text = GOOD.replace("epochs: 1", "epocs: 1")
    with pytest.raises(
        RecipeError,
        match=r"r\.yaml:7: stages\[0\] \(finetune\)\.epocs: unknown key \(did you mean 'epochs'\?\)",
    ):
        check(text)


def test_literal_error_lists_choices_and_value():
    text = GOOD.replace("epochs: 1", "optimizer: sgdd")
    with pytest.raises(RecipeError, match=r"optimizer: must be one of 'sgd', 'adam', 'adamw' \(got 'sgdd'\)"):
        check(text)


def test_every_problem_is_collected():
    text = GOOD.replace("epochs: 1", "epochs: -1\n    optimizer: x").replace(
        "name: demo", "name: demo\nseed: abc"
    )
    with pytest.raises(RecipeError) as e:
        check(text)
    assert len(e.value.problems) == 3
    assert any("seed" in p for p in e.value.problems)
    assert any("epochs: must be greater than or equal to 0 (got -1)" in p for p in e.value.problems)


def test_yaml_syntax_error_has_line():
    with pytest.raises(
        RecipeError, match=r"r\.yaml:4: YAML syntax error: expected ',' or '\]'.*started at line 3"
    ):
        check("version: 1\nname: x\nmodel: [unclosed\n")


def test_not_a_mapping():
    with pytest.raises(RecipeError, match="must be a mapping"):
        check("- a\n- b\n")


def test_missing_required_key():
    with pytest.raises(RecipeError, match=r"model: required key is missing"):
        check("version: 1\nname: x\n")


def test_stages_must_be_list_of_mappings():
    with pytest.raises(RecipeError, match=r"stages\[0\]: must be a mapping"):
        check(GOOD.split("stages:")[0] + "stages:\n  - finetune\n")
    with pytest.raises(RecipeError, match=r"stages\[0\]\.type: required key is missing"):
        check(GOOD.split("stages:")[0] + "stages:\n  - {epochs: 1}\n")


def test_version_and_device_rules():
    with pytest.raises(RecipeError, match=r"r\.yaml:1: version: must be one of 1 \(got 2\)"):
        check(GOOD.replace("version: 1", "version: 2"))
    with pytest.raises(RecipeError, match=r"device: must be auto, cpu, cuda, cuda:N or mps"):
        check(GOOD + "device: gpu\n")


def test_auto_lr_needs_a_finder_earlier():
    with pytest.raises(RecipeError, match=r"stages\[0\] \(finetune\)\.lr: 'auto' needs lr_find earlier"):
        check(GOOD.replace("epochs: 1", "lr: auto"))
    with pytest.raises(RecipeError, match=r"batch_size: 'auto' needs batch_size_find"):
        check(GOOD.replace("epochs: 1", "batch_size: auto"))


def test_set_overrides_are_validated_and_located():
    r = check(GOOD, "stages.0.epochs=3", "seed=7", "data.batch_size=16")
    assert r.stages[0].epochs == 3 and r.seed == 7 and r.data.batch_size == 16
    with pytest.raises(RecipeError, match=r"--set stages\.0\.epochs=-2: stages\[0\] \(finetune\)\.epochs"):
        check(GOOD, "stages.0.epochs=-2")
    with pytest.raises(RecipeError, match="expected key.path=value"):
        check(GOOD, "seed")
    with pytest.raises(RecipeError, match="no element stages.5"):
        check(GOOD, "stages.5.epochs=1")


def test_set_can_append_a_stage():
    r = check(GOOD, "stages.2={type: evaluate, name: last}")
    assert r.stages[-1].name == "last"


def test_recipe_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="is a directory"):
        load_recipe(tmp_path)


def test_json_schema_has_every_stage():
    s = json_schema()
    variants = s["properties"]["stages"]["items"]["oneOf"]
    types = {v["properties"]["type"]["const"] for v in variants}
    assert {"finetune", "evaluate"} <= types
    assert s["additionalProperties"] is False


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    r, _ = load_recipe(path)
    assert r.stages, f"{path.name} has no stages"
    yaml.safe_load(path.read_text())


def test_unknown_sources_fail_validation_with_suggestion():
    with pytest.raises(
        RecipeError,
        match=r"r\.yaml:4: model\.source: unknown zoo model 'digits_mpl' \(did you mean 'digits_mlp'\?\)",
    ):
        check(GOOD.replace("zoo:digits_mlp", "zoo:digits_mpl"))
    with pytest.raises(
        RecipeError,
        match=r"data\.source: unknown data source 'fashion_mnsit' \(did you mean 'fashion_mnist'\?\)",
    ):
        check(GOOD + "data: {source: fashion_mnsit}\n")


def test_zoo_names_constant_matches_zoo():
    from compress_cli.sources.spec import ZOO_NAMES
    from compress_cli.sources.zoo import ZOO

    assert set(ZOO_NAMES) == set(ZOO)
