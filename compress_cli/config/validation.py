"""Raw recipe -> ``Recipe``, in two passes that collect every problem before failing.

Pass one validates each stage entry through its own config class (looked up by type), pass two
the top level; the cross-stage rules run once both are clean. Problems are one located line each
(:mod:`compress_cli.config.problems`); top-level problems come first, then the stages' in order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from compress_cli.config.problems import fmt_value, pydantic_problems
from compress_cli.config.recipe import Recipe
from compress_cli.config.rules import cross_stage_rules
from compress_cli.config.stage import StageConfig, StageSpec
from compress_cli.config.yaml import RawRecipe
from compress_cli.errors import RecipeError, did_you_mean


def recipe_from_raw(raw: RawRecipe, stages: Mapping[str, StageSpec]) -> Recipe:
    """Validate parsed YAML; ``stages`` maps each known stage type to its class (the registry's).

    Raises one :class:`RecipeError` listing every problem.
    """
    data = raw.data
    if not isinstance(data, dict):
        raise RecipeError(
            f"{raw.filename}:1: the recipe must be a mapping of keys (got {type(data).__name__})"
        )
    stage_cfgs, stage_types, problems = _stage_configs(raw, data.get("stages", []), stages)
    top = {k: v for k, v in data.items() if k != "stages"}
    recipe: Recipe | None = None
    try:
        recipe = Recipe.model_validate(top)
    except ValidationError as e:
        problems = pydantic_problems(e, raw, (), Recipe, stage_types) + problems
    if recipe is not None and not problems:
        recipe = recipe.model_copy(update={"stages": stage_cfgs})
        problems.extend(cross_stage_rules(recipe, stages, raw))
    if problems or recipe is None:
        raise RecipeError(problems)
    return recipe


def _stage_configs(
    raw: RawRecipe, stages_raw: Any, stages: Mapping[str, StageSpec]
) -> tuple[list[StageConfig], dict[int, str], list[str]]:
    """Each ``stages`` entry through its type's config class -> (configs, index -> type, problems)."""
    problems: list[str] = []
    stage_types: dict[int, str] = {}
    stage_cfgs: list[StageConfig] = []
    if not isinstance(stages_raw, list):
        problems.append(
            f"{raw.where(('stages',))}: stages: must be a list of stages (got {fmt_value(stages_raw)})"
        )
        stages_raw = []
    known = sorted(stages)
    for i, item in enumerate(stages_raw):
        path = ("stages", i)
        if not isinstance(item, dict):
            problems.append(
                f"{raw.where(path)}: stages[{i}]: must be a mapping with a 'type' key (got {fmt_value(item)})"
            )
            continue
        t = item.get("type")
        if not isinstance(t, str):
            problems.append(
                f"{raw.where(path)}: stages[{i}].type: required key is missing (one of {', '.join(known)})"
            )
            continue
        if t not in known:
            problems.append(
                f"{raw.where((*path, 'type'))}: stages[{i}].type: "
                f"unknown stage type {t!r}{did_you_mean(t, known)}"
            )
            continue
        stage_types[i] = t
        config_class = stages[t].config_class
        try:
            stage_cfgs.append(config_class.model_validate(item))
        except ValidationError as e:
            problems.extend(pydantic_problems(e, raw, path, config_class, stage_types))
    return stage_cfgs, stage_types, problems
