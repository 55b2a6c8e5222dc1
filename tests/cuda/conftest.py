"""Fixtures of the CUDA tests. ``device`` runs a test body on CPU and, marked ``cuda``, on the GPU:
what the path does besides the kernels (moves, dtypes, notes, files) is checked on every machine,
so a logic error shows without a GPU. ``make_state`` builds a pipeline State on a device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device a test body runs on: cpu everywhere, cuda (marked) where there is one."""
    return torch.device(request.param)


@pytest.fixture
def make_state(tmp_path: Path):
    """make_state(device, stages=(), model="zoo:digits_mlp", **recipe overrides) -> a State on ``device``
    over the digits data (512 training samples), writing to tmp_path/out."""
    from compress_cli.config.yaml import parse_yaml
    from compress_cli.engine.setup import build_state
    from compress_cli.stages.registry import validate
    from compress_cli.testing import tiny_recipe_dict

    def _make(
        device: torch.device | str,
        stages: list[dict[str, Any]] | tuple = (),
        model: str = "zoo:digits_mlp",
        **over: Any,
    ) -> Any:
        dev = torch.device(device)
        d = tiny_recipe_dict(
            tmp_path,
            stages=list(stages),
            device=dev.type,
            model={"source": model},
            **{"data": {"limit_train": 512}, **over},
        )
        recipe = validate(parse_yaml(yaml.safe_dump(d)))
        return build_state(recipe, dev, tmp_path / "out")

    return _make
