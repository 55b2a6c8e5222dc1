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


#: stages whose structured-input path is another helper's work (ONNX export, ORT runners and
#: quantization replays with named inputs); the lead removes these marks when that work is merged
@pytest.mark.parametrize("name", STAGES)
def test_stage_contract_on_structured_inputs(name, tmp_path):
    """Every stage on ``compress_cli.testing.dict_model`` (keyword inputs, a dict output) with
    unlabelled dict batches and ``task: fidelity``: it runs, is deterministic, reports the task's
    metrics and its output reloads."""
    from compress_cli.testing import dict_recipe_dict, token_data

    cls = get_stage(name)
    batch = torch.utils.data.default_collate([token_data(n_train=8, n_test=8)["test"][i] for i in range(8)])

    def run(tag: str) -> tuple[dict, torch.Tensor]:
        d = dict_recipe_dict(
            tmp_path / tag,
            stages=[{"type": name, **cls.example}],
            measure={"latency": {"batch_sizes": [1, 16], "warmup": 1, "iterations": 2}, "macs": False},
        )
        report = run_recipe(validate(parse_yaml(yaml.safe_dump(d))))
        model = compress_cli.load(tmp_path / tag / "out" / "model", trust_source=True)
        with torch.no_grad():
            return report, model(**batch)["logits"]

    r1, y1 = run("a")
    r2, y2 = run("b")
    assert torch.isfinite(y1).all()
    assert torch.equal(y1, y2), f"{name}: not deterministic under a fixed seed"
    final = r1["final"]
    assert final["task"] == "fidelity" and final["primary"] == "cosine"
    assert final["score"] == r2["final"]["score"] and 0.0 < final["score"] <= 1.0 + 1e-6
    assert {"cosine", "sqnr_db", "relative_mse"} <= set(final["scores"])
    assert "input_ids" in final["latency_input"]
