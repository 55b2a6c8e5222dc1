"""The tuning recipes validate, and the digits chain lr_find -> batch_size_find -> finetune(auto)
runs end to end with the found values filled in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from compress_cli.cli import app
from compress_cli.stages.registry import list_stages, load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("name", ["tuning_digits.yaml", "hpo_digits.yaml", "tuning.yaml"])
def test_recipe_validates(name):
    if name == "tuning.yaml" and "prune" not in list_stages():
        pytest.skip("recipes/tuning.yaml uses the prune stage, which is not registered in this build")
    recipe, _ = load_recipe(RECIPES / name)
    assert recipe.stages


def test_tuning_chain_runs_and_fills_auto(tmp_path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path / "run"
        r = CliRunner().invoke(
            app,
            [
                "run",
                str(RECIPES / "tuning_digits.yaml"),
                "--device",
                "cpu",
                "--output",
                str(out),
                "-q",
                "--set",
                "stages.0.steps=30",
                "--set",
                "stages.0.skip_start=3",
                "--set",
                "stages.1.max_batch_size=64",
                "--set",
                "stages.2.epochs=1",
                "--set",
                "stages.2.scheduler=none",
                "--set",
                "measure.latency=null",
            ],
        )
    finally:
        torch.set_num_threads(n)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    lr_find, bs_find, finetune = report["stages"]
    hp = report["hparams"]
    assert hp["batch_size"] == bs_find["details"]["batch_size"] <= 64
    assert hp["lr"] == pytest.approx(lr_find["details"]["lr"] * hp["batch_size"] / 64)  # scale_lr
    assert finetune["details"]["history"][0]["lr"] == pytest.approx(hp["lr"])  # the auto values were used
    assert (out / "lr_find-01.png").is_file()
