"""JSON Schema of the recipe format (``compress schema``, for yaml-language-server)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from compress_cli.config.recipe import Recipe

if TYPE_CHECKING:
    from compress_cli.config.stage import StageSpec


def recipe_schema(stages: Mapping[str, StageSpec]) -> dict[str, Any]:
    """The ``Recipe`` schema with each stage's config under a oneOf on ``type`` (stage types sorted)."""
    schema = Recipe.model_json_schema()
    variants = []
    defs = schema.setdefault("$defs", {})
    for name in sorted(stages):
        sub = stages[name].config_class.model_json_schema(ref_template="#/$defs/{model}")
        for k, v in sub.pop("$defs", {}).items():
            defs[k] = v
        sub["properties"]["type"] = {"const": name, "description": "stage type"}
        sub["required"] = sorted(set(sub.get("required", [])) | {"type"})
        sub["title"] = f"stage {name}"
        variants.append(sub)
    schema["properties"]["stages"] = {"type": "array", "items": {"oneOf": variants}}
    defs.pop("StageConfig", None)
    # composition (config/yaml.py): a recipe that extends others may leave out what they set
    schema["properties"]["extends"] = {
        "description": "base recipe file(s), relative to this one, deep-merged under it (later ones win)",
        "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}],
    }
    schema["properties"]["stages+"] = {
        "description": "stages appended after the base recipe's (stages: replaces them)",
        **schema["properties"]["stages"],
    }
    required = schema.pop("required", [])
    if required:
        schema["if"] = {"required": ["extends"]}
        schema["else"] = {"required": required}
    return schema
