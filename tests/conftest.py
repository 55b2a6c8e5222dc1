from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from compress_cli.testing import tiny_recipe_dict

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def write_recipe(tmp_path: Path):
    """write_recipe(stages=[...], **overrides) -> path of a recipe YAML in tmp_path."""

    def _write(
        stages: list[dict[str, Any]] | None = None, name: str = "recipe.yaml", **overrides: Any
    ) -> Path:
        d = tiny_recipe_dict(tmp_path, stages=stages, **overrides)
        p = tmp_path / name
        p.write_text(yaml.safe_dump(d, sort_keys=False))
        return p

    return _write
