"""Training and scoring stages through the task on a dict-input model with unlabelled data:
finetune and distill without labels (task: fidelity), an hpo objective by a task metric, and
drop_layers ranked by the task's loss or by output similarity."""

from __future__ import annotations

import pytest
import torch

from compress_cli.config.recipe import Recipe, TaskConfig
from compress_cli.engine.setup import build_state
from compress_cli.errors import StageError
from compress_cli.runtime.measure import evaluate
from compress_cli.stages.registry import get_stage
from compress_cli.tasks import build_task
from compress_cli.testing import dict_recipe_dict


def make_state(tmp_path, **overrides):
    d = dict_recipe_dict(tmp_path, **overrides)
    return build_state(Recipe.model_validate(d), torch.device("cpu"), tmp_path / "out")


def perturb(model, scale=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g) * p.std())


def cosine(state):
    task = state.data.get_task()
    return evaluate(lambda x: state.model(**x), state.data.loader("val"), task, split="val")["cosine"]


def run_stage(state, cfg, index=1):
    cls = get_stage(cfg["type"])
    stage = cls(cls.config_class.model_validate(cfg), index)
    stage.preflight(state)
    return stage.run(state)


def test_finetune_with_fidelity_on_unlabelled_data_pulls_a_perturbed_copy_back(tmp_path):
    state = make_state(tmp_path)
    assert not state.data.labelled
    perturb(state.model)
    before = cosine(state)
    res = run_stage(state, {"type": "finetune", "epochs": 3, "lr": 0.01})
    after = cosine(state)
    assert after > before + 0.01, (before, after)
    d = res.details
    assert d["val_metric"] == "cosine" and d["best_val_accuracy"] is None
    assert d["best_val_score"] == max(h["val_score"] for h in d["history"])
    assert {"val_cosine", "val_sqnr_db", "val_relative_mse", "val_score"} <= set(d["history"][-1])
    assert "val cosine" in res.notes


def test_label_smoothing_is_refused_outside_classification(tmp_path):
    state = make_state(tmp_path)
    with pytest.raises(StageError, match="label_smoothing applies to the classification task"):
        run_stage(state, {"type": "finetune", "epochs": 1, "label_smoothing": 0.1})


def test_distill_alpha_1_on_unlabelled_dict_batches(tmp_path):
    state = make_state(tmp_path)
    perturb(state.model)
    before = cosine(state)
    res = run_stage(state, {"type": "distill", "epochs": 3, "lr": 0.01, "alpha": 1.0, "cache_teacher": True})
    assert res.details["kd_loss"] == "mse"  # fidelity's loss (task.kwargs.loss) on the logits
    assert res.details["teacher_cache"]["samples"] == len(state.data.train_dataset)
    assert cosine(state) > before + 0.01


def test_distill_hard_term_needs_labels_the_fidelity_task_does_not(tmp_path):
    state = make_state(tmp_path)
    perturb(state.model)
    before = cosine(state)
    # alpha < 1: the hard term is fidelity's own loss against the original, no labels needed
    res = run_stage(state, {"type": "distill", "epochs": 2, "lr": 0.01, "alpha": 0.5, "kd_loss": "cosine"})
    assert res.details["kd_loss"] == "cosine" and cosine(state) > before
    state = make_state(tmp_path / "c")
    state.data.task = build_task(TaskConfig(type="classification"))  # a task that needs labels
    with pytest.raises(StageError, match="no labels for the classification task"):
        run_stage(state, {"type": "distill", "alpha": 0.5})


def test_hpo_objective_by_a_task_metric(tmp_path):
    state = make_state(tmp_path)
    perturb(state.model)
    cfg = {
        "type": "hpo",
        "stages": [{"type": "finetune", "epochs": 1}],
        "space": {"finetune.lr": {"categorical": [1e-6, 1e-2]}},
        "n_trials": 2,
        "pruner": "median",
        "sampler": "random",
        "storage": "memory",
        "objectives": ["relative_mse"],
    }
    res = run_stage(state, cfg)
    d = res.details
    assert d["objectives"] == {"relative_mse": "minimize"}  # the direction comes from the task
    # the tiny lr barely moves the perturbed copy; the larger one pulls it towards the original
    assert d["best"]["params"]["finetune.lr"] == 1e-2, d
    with pytest.raises(StageError, match="'cosin' is not a metric of the task"):
        run_stage(make_state(tmp_path / "b"), {**cfg, "objectives": ["cosin"]})


def test_hpo_default_objective_is_the_task_primary_without_accuracy(tmp_path):
    state = make_state(tmp_path)
    cfg = {
        "type": "hpo",
        "stages": [{"type": "finetune", "epochs": 1, "max_steps_per_epoch": 2}],
        "space": {"finetune.lr": {"float": [1e-3, 1e-2]}},
        "n_trials": 2,
        "pruner": "none",
        "storage": "memory",
    }
    assert run_stage(state, cfg).details["objectives"] == {"score": "maximize"}


@pytest.mark.parametrize("importance", ["loss", "output"])
def test_drop_layers_on_the_dict_model(tmp_path, importance):
    state = make_state(tmp_path)
    res = run_stage(state, {"type": "drop_layers", "count": 1, "importance": importance})
    cands = res.details["candidates"]
    assert {c["name"] for c in cands} == {"blocks.0", "blocks.1"}
    assert all(c["score"] is not None and c["score"] >= 0 for c in cands)
    removed = min(cands, key=lambda c: c["score"])["name"]
    assert res.details["removed"] == [removed]
    assert res.details["exactness"]["max_abs_diff"] <= res.details["exactness"]["tolerance"]
    assert 0 < cosine(state) < 1


def test_drop_layers_loss_needs_labels_for_classification(tmp_path):
    state = make_state(tmp_path)
    state.data.task = build_task(TaskConfig(type="classification"))  # a task that needs labels
    with pytest.raises(StageError, match="importance 'loss' needs labelled data for the classification task"):
        run_stage(state, {"type": "drop_layers", "count": 1, "importance": "loss"})


def test_prune_channels_taylor_through_the_fidelity_loss(tmp_path):
    state = make_state(tmp_path)
    perturb(state.model, 0.1)  # a nonzero fidelity loss, so the gradients score something
    res = run_stage(state, {"type": "prune_channels", "ratio": 0.25, "importance": "taylor"})
    assert res.details["channels_after"] < res.details["channels_before"]
    assert res.details["exactness"]["max_abs_diff"] <= res.details["exactness"]["tolerance"]
