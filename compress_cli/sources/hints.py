"""Hints that name the recipe key which fixes a model/data mismatch, for the sources at hand.

A class-count mismatch is fixed on the model side (``model.kwargs.num_classes`` of a zoo,
torchvision or timm model, ``num_labels`` of a Hugging Face one, the callable's own argument)
unless the model's weights are fixed (a checkpoint, a compressed model directory), and on the
data side where the data's class count is a setting (``data.num_classes`` of synthetic data, or
of a dataset whose labels are a subset of the model's classes). Imports nothing heavy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from compress_cli.sources.spec import parse_model_source

if TYPE_CHECKING:
    from compress_cli.config.recipe import DataConfig, ModelConfig


def num_classes_hint(
    model: ModelConfig, data: DataConfig, model_classes: int, data_classes: int, where: str = "model"
) -> str:
    """What to set when a model of ``model_classes`` outputs meets data of ``data_classes``
    classes, as ``set KEY: VALUE`` alternatives, best first. ``where``: the recipe path of the
    model config (``model``, or a stage's ``teacher`` / ``student``)."""
    ways: list[str] = []
    try:
        kind = parse_model_source(model.source).kind
    except ValueError:
        kind = "callable"
    weights_fixed = kind == "directory" or model.checkpoint is not None
    synthetic = data.source == "synthetic"
    if synthetic:
        ways.append(f"data.num_classes: {model_classes} (synthetic data has the classes you ask for)")
    if not weights_fixed:
        key = f"{where}.kwargs.num_classes: {data_classes}"
        if kind == "hf":  # a transformers config field
            key = (
                f"{where}.kwargs.num_labels: {data_classes} "
                "(with hf_class: AutoModelForSequenceClassification)"
            )
        elif kind == "callable":
            key += f" (or the argument {model.source} takes for its class count)"
        ways.append(key)
    if not synthetic and model_classes > data_classes:
        ways.append(
            f"data.num_classes: {model_classes} if the data's labels are a subset of the model's classes"
        )
    if not ways:
        what = "checkpoint" if model.checkpoint is not None else "compressed model"
        return (
            f"the {what} has {model_classes} outputs, fixed by its weights: use data with "
            f"{model_classes} classes (data.source)"
        )
    return "set " + "; or ".join(ways)
