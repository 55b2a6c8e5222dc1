"""Up-front refusals (issue 15, item 4): what the loaded model already tells is refused before the
baseline, by ``compress validate --model`` and ``compress run``: a model the manifest could not
save, a module a stage would put in that it could not describe, a stage with nothing to apply to,
a teacher or student that does not fit; later stages are not checked against a model a distill
stage replaces."""

from __future__ import annotations

import pytest
import torch
import yaml
from torch import nn

from compress_cli.config.yaml import parse_yaml
from compress_cli.engine.setup import build_state, preflight
from compress_cli.errors import RecipeError
from compress_cli.stages.registry import validate
from compress_cli.testing import tiny_recipe_dict


class Gate(nn.Module):
    """A custom layer of this test module (a package the manifest may not name)."""

    def __init__(self, width: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return x * self.scale


GATE = f"{Gate.__module__}:Gate"


def state_for(tmp_path, stages, **overrides):
    d = tiny_recipe_dict(tmp_path, stages=stages, **overrides)
    recipe = validate(parse_yaml(yaml.safe_dump(d), "r.yaml"))
    return build_state(recipe, torch.device("cpu"), tmp_path / "out")


def test_a_loaded_model_the_manifest_cannot_save_is_refused(tmp_path):
    state = state_for(tmp_path, [{"type": "evaluate"}])
    assert preflight(state) == []
    state.model.relu1 = nn.Sequential(Gate(128), nn.ReLU())  # e.g. a pickled module of another architecture
    (line,) = preflight(state)
    assert line.startswith(
        f"model: cannot be saved as a model directory: module 'relu1.0' ({GATE}), inside the new Sequential "
        "'relu1', differs from the model source and cannot be described in the manifest: its class is from "
        f"package {Gate.__module__.split('.')[0]!r}"
    )


def test_a_module_a_stage_would_put_in_is_checked_before_it_runs(tmp_path):
    """``Stage.new_modules``: what a stage may put into the model is checked by the engine."""
    from compress_cli.engine.setup import _new_module_problems
    from compress_cli.stages.evaluate import Evaluate

    class Gating(Evaluate):
        """A stage that would put a custom Gate into the model."""

        def new_modules(self, state):
            return [("fc2", nn.Sequential(Gate(64)))]

    state = state_for(tmp_path, [{"type": "evaluate"}])
    (problem,) = _new_module_problems(Gating(state.recipe.stages[0], 1), state)
    assert problem.startswith(
        f"module 'fc2.0' ({GATE}), inside the new Sequential 'fc2', cannot be described in the manifest"
    )
    assert "protect" in problem


def test_drop_layers_new_modules_are_its_candidates_bypasses(tmp_path):
    from compress_cli.stages.drop_layers import DropLayers

    state = state_for(tmp_path, [{"type": "drop_layers", "count": 1}], model={"source": "zoo:digits_resnet"})
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    got = dict(DropLayers(state.recipe.stages[0], 1).new_modules(state))
    assert set(got) == {"layer1.0", "layer2.0", "layer3.0"}
    # identity or downsample shortcut, then the block's ReLU after the add
    assert [type(m).__name__ for m in got["layer1.0"]] == ["ReLU"]
    assert [type(m).__name__ for m in got["layer2.0"]] == ["Conv2d", "BatchNorm2d", "ReLU"]
    sd = state.model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in before.items())  # found on a copy
    assert preflight(state) == []


def test_prune_and_codebook_with_nothing_to_apply_to_are_refused_up_front(tmp_path):
    state = state_for(
        tmp_path,
        [
            {"type": "prune", "sparsity": 0.5, "include": ["nothing*"]},
            {"type": "codebook", "bits": 4, "layers": {"fc9": 2}},
        ],
    )
    problems = preflight(state)
    assert problems[0].startswith(
        "stages[0] (prune): no prunable layer (Linear/Conv) matches include ['nothing*']"
    )
    assert problems[1].startswith("stages[1] (codebook): layers: 'fc9' match no selected layer")


def test_a_student_that_does_not_fit_the_data_names_its_recipe_key(tmp_path):
    student = {"source": "zoo:digits_mlp", "kwargs": {"num_classes": 4}}
    state = state_for(tmp_path, [{"type": "distill", "epochs": 1, "student": student}])
    (line,) = preflight(state)
    assert line == (
        "stages[0] (distill): model outputs 4 classes but the data has 10: "
        "set stages[0].student.kwargs.num_classes: 10"
    )


def test_stages_after_a_new_student_are_not_checked_against_the_old_model(tmp_path):
    prune = {"type": "prune", "sparsity": 0.5, "include": ["fc1"]}
    state = state_for(tmp_path, [prune], model={"source": "zoo:digits_cnn"})
    assert preflight(state)[0].startswith("stages[0] (prune): no prunable layer")
    distill = {"type": "distill", "epochs": 1, "student": "zoo:digits_mlp"}
    state = state_for(tmp_path, [distill, prune], model={"source": "zoo:digits_cnn"})
    assert preflight(state) == []  # digits_mlp, the student prune will see, has fc1


def test_scale_lr_without_an_lr_is_refused_by_validation(tmp_path):
    d = tiny_recipe_dict(tmp_path, stages=[{"type": "batch_size_find", "scale_lr": True}])
    with pytest.raises(RecipeError, match=r"scale_lr: no lr to scale \(run lr_find before this stage"):
        validate(parse_yaml(yaml.safe_dump(d), "r.yaml"))
    d["stages"].insert(0, {"type": "lr_find", "steps": 10})
    assert validate(parse_yaml(yaml.safe_dump(d), "r.yaml")).stages[1].scale_lr
