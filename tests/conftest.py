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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` are skipped, with the reason, on a machine without a CUDA device
    (``pytest -m cuda`` on a GPU machine runs them: scripts/gpu_check.sh)."""
    marked = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(
        reason="needs a CUDA device (none here): scripts/gpu_check.sh runs these on a GPU"
    )
    for item in marked:
        item.add_marker(skip)
