"""Every registered stage, with no per-stage branches: builds from its example config, validates
inside a recipe, runs on CPU quickly, is deterministic under a seed, and its output reloads."""

from __future__ import annotations

import time

import pytest
import torch
import yaml

import compress_cli
from compress_cli.config.yaml import parse_yaml
from compress_cli.engine.run import run_recipe
from compress_cli.stages.registry import get_stage, list_stages, validate
from compress_cli.testing import tiny_recipe_dict

STAGES = list_stages()


def test_registry_has_the_foundation_stages():
    assert {"evaluate", "finetune"} <= set(STAGES)


@pytest.mark.parametrize("name", STAGES)
def test_stage_contract(name, tmp_path):
    cls = get_stage(name)
    assert cls.__doc__ and cls.__doc__.strip(), f"{name}: stage class needs a docstring"
    for fname, f in cls.config_class.model_fields.items():
        assert fname == "type" or f.description, f"{name}.{fname}: every config field needs a description"
    cfg = cls.config_class.model_validate({"type": name, **cls.example})
    assert cfg.type == name

    def run(tag: str) -> tuple[dict, torch.Tensor]:
        d = tiny_recipe_dict(
            tmp_path / tag,
            stages=[{"type": name, **cls.example}],
            model={"source": "zoo:digits_cnn"},
            data={"limit_train": 384, "limit_test": 256},
            measure={"latency": {"batch_sizes": [1, 16], "warmup": 1, "iterations": 2}, "macs": False},
        )
        recipe = validate(parse_yaml(yaml.safe_dump(d)))
        t0 = time.perf_counter()
        report = run_recipe(recipe)
        elapsed = time.perf_counter() - t0
        assert elapsed < 60, f"{name}: example took {elapsed:.1f}s"
        model = compress_cli.load(tmp_path / tag / "out" / "model")
        x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            return report, model(x)

    r1, y1 = run("a")
    r2, y2 = run("b")
    assert torch.isfinite(y1).all()
    assert torch.equal(y1, y2), f"{name}: not deterministic under a fixed seed"
    assert r1["final"]["accuracy"] == r2["final"]["accuracy"]
    stage = r1["stages"][0]
    for key in (
        "accuracy",
        "loss",
        "params",
        "nonzero_params",
        "size_bytes",
        "macs",
        "latency_ms",
        "throughput",
    ):
        assert key in stage["metrics"]
