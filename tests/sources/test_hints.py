"""A class-count mismatch names the recipe key that fixes it for the sources at hand (issue 15):
``model.kwargs.num_classes`` of a buildable model, ``data.num_classes`` of synthetic data, the data
side only when the model's weights are fixed."""

from __future__ import annotations

import pytest
import torch

from compress_cli.config.recipe import DataConfig, ModelConfig
from compress_cli.errors import SourceError
from compress_cli.sources.hints import num_classes_hint
from compress_cli.testing import save_tiny_checkpoint, tiny_recipe_dict


def hint(model: dict, data: dict, m: int, n: int, where: str = "model") -> str:
    return num_classes_hint(ModelConfig(**model), DataConfig(**data), m, n, where)


def test_a_zoo_model_on_a_dataset_is_fixed_on_the_model_side():
    assert (
        hint({"source": "zoo:digits_cnn"}, {"source": "digits"}, 3, 10) == "set model.kwargs.num_classes: 10"
    )


def test_synthetic_data_takes_data_num_classes_first():
    got = hint(
        {"source": "torchvision:resnet18"}, {"source": "synthetic", "input_shape": [3, 8, 8]}, 1000, 10
    )
    assert got.startswith("set data.num_classes: 1000 (synthetic data")
    assert "; or model.kwargs.num_classes: 10" in got


def test_a_callable_source_names_its_own_argument_and_a_stage_model_its_key():
    got = hint({"source": "mypkg.models:build"}, {"source": "digits"}, 5, 10, where="stages[1].teacher")
    assert got == (
        "set stages[1].teacher.kwargs.num_classes: 10 "
        "(or the argument mypkg.models:build takes for its class count)"
    )


def test_timm_takes_num_classes_and_hf_num_labels():
    assert (
        hint({"source": "timm:resnet18"}, {"source": "digits"}, 5, 10) == "set model.kwargs.num_classes: 10"
    )
    got = hint({"source": "hf:/models/bert"}, {"source": "text"}, 2, 3)
    assert got == "set model.kwargs.num_labels: 3 (with hf_class: AutoModelForSequenceClassification)"


def test_fixed_weights_leave_only_the_data_side(tmp_path):
    ckpt = str(save_tiny_checkpoint(tmp_path / "w.pt"))
    got = hint({"source": "zoo:digits_mlp", "checkpoint": ckpt}, {"source": "digits"}, 12, 10)
    assert got == "set data.num_classes: 12 if the data's labels are a subset of the model's classes"
    got = hint({"source": "zoo:digits_mlp", "checkpoint": ckpt}, {"source": "digits"}, 3, 10)
    assert got == "the checkpoint has 3 outputs, fixed by its weights: use data with 3 classes (data.source)"


@pytest.mark.parametrize(
    "data, expected",
    [
        ({}, "but the data has 10: set model.kwargs.num_classes: 10"),
        (
            {"source": "synthetic", "input_shape": [1, 8, 8], "num_classes": 4},
            "but the data has 4: set data.num_classes: 7 (synthetic data",
        ),
    ],
)
def test_the_run_refuses_a_mismatch_with_the_hint_for_its_sources(tmp_path, data, expected):
    from compress_cli.config.recipe import Recipe
    from compress_cli.engine.setup import build_state

    model = {"source": "zoo:digits_mlp", "kwargs": {"num_classes": 7}}
    recipe = Recipe.model_validate(tiny_recipe_dict(tmp_path, model=model, data=data))
    with pytest.raises(SourceError, match=r"model outputs 7 classes " + expected.replace("(", r"\(")):
        build_state(recipe, torch.device("cpu"), tmp_path / "out")
