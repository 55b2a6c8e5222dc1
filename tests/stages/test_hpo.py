"""hpo: located validation of the wrapped stages and the space, trials on the digits MLP (pruning,
failures, resume from the SQLite study, interruption marks the trial failed), multi-objective."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from compress_cli.config.recipe import Recipe
from compress_cli.config.yaml import parse_yaml
from compress_cli.errors import RecipeError, StageError
from compress_cli.stages.registry import get_stage, validate


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_state(tmp_path: Path, **data):
    from compress_cli.engine.setup import build_state

    recipe = Recipe.model_validate(
        {
            "name": "t",
            "device": "cpu",
            "model": {"source": "zoo:digits_mlp"},
            "data": {"source": "digits", **data},
            "output": str(tmp_path / "out"),
        }
    )
    return build_state(recipe, torch.device("cpu"), tmp_path / "out")


def hpo(**cfg):
    cls = get_stage("hpo")
    return cls(cls.config_class.model_validate({"type": "hpo", **cfg}), 1)


def check(stages: list[dict]):
    text = yaml.safe_dump(
        {"version": 1, "name": "t", "model": {"source": "zoo:digits_mlp"}, "stages": stages}, sort_keys=False
    )
    return validate(parse_yaml(text, "r.yaml"))


FT = {"type": "finetune", "epochs": 2, "max_steps_per_epoch": 4}
LR = {"finetune.lr": {"float": [1e-3, 1e-1], "log": True}}


def study_trials(tmp_path: Path, name: str = "t-hpo-1"):
    url = f"sqlite:///{(tmp_path / 'out' / 'hpo-01.db').resolve()}"
    return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


# ------------------------------------------------------------------ validation
def test_valid_config_and_nested_rules():
    r = check([{"type": "lr_find"}, {"type": "hpo", "stages": [{**FT, "lr": "auto"}], "space": LR}])
    h = r.stages[1]
    assert type(h.stages[0]).__name__ == "FinetuneConfig" and h.stages[0].lr == "auto"
    assert get_stage("hpo").trains(h) and get_stage("hpo").modifies(h)
    only_eval = check(
        [
            {
                "type": "hpo",
                "stages": [{"type": "evaluate"}, {**FT, "name": "ft"}],
                "space": {"ft.lr": {"float": [1e-3, 1e-1]}},
            }
        ]
    ).stages[0]
    assert get_stage("hpo").trains(only_eval)
    assert not get_stage("hpo").trains(only_eval.model_copy(update={"stages": only_eval.stages[:1]}))


@pytest.mark.parametrize(
    "stage,pattern",
    [
        (
            {"stages": [{**FT, "epochs": -1}], "space": LR},
            r"r.yaml:\d+: stages\[0\] \(hpo\).stages\[0\].epochs: "
            r"finetune: must be greater than or equal to 0 \(got -1\)",
        ),
        (
            {"stages": [{**FT, "lrr": 0.1}], "space": LR},
            r"stages\[0\] \(hpo\).stages\[0\].lrr: unknown key for finetune \(did you mean 'lr'\?\)",
        ),
        (
            {"stages": [{"type": "finetun"}], "space": LR},
            r"stages\[0\] \(hpo\).stages\[0\].type: "
            r"unknown stage type 'finetun' \(did you mean 'finetune'\?\)",
        ),
        (
            {"stages": [FT], "space": {"prune.sparsity": {"float": [0.1, 0.9]}}},
            r"space.prune.sparsity: space key 'prune.sparsity': no wrapped stage named 'prune'",
        ),
        (
            {"stages": [FT], "space": {"finetune.lrate": {"float": [0.1, 0.9]}}},
            r"finetune has no parameter 'lrate'",
        ),
        (
            {"stages": [FT], "space": {"finetune.epochs": {"int": [-1, 3]}}},
            r"space.finetune.epochs: value -1 is not valid for finetune.epochs",
        ),
        ({"stages": [FT], "space": {"finetune.lr": {"float": [0.1, 0.01]}}}, r"space.finetune.lr: .*lo < hi"),
        ({"stages": [FT], "space": {"finetune.lr": {"float": [0.0, 0.1], "log": True}}}, r"log needs lo > 0"),
        (
            {"stages": [FT], "space": {"finetune.lr": {"float": [0.001, 0.1], "int": [1, 2]}}},
            r"give exactly one of float, int, categorical",
        ),
        (
            {"stages": [FT], "space": {"finetune.optimizer": {"categorical": ["sgd", "lion"]}}},
            r"value 'lion' is not valid for finetune.optimizer",
        ),
        (
            {"stages": [FT], "space": LR, "objectives": ["accuracy", "latency_ms"]},
            r"pruner: pruning needs a single objective",
        ),
        ({"stages": [FT], "space": LR, "n_trials": None}, r"n_trials: set n_trials and/or timeout_s"),
        (
            {"stages": [{**FT, "lr": "auto"}], "space": LR},
            r"stages\[0\] \(hpo\).stages\[0\] \(finetune\).lr: 'auto' needs lr_find earlier",
        ),
    ],
)
def test_invalid_configs_are_located(stage, pattern):
    with pytest.raises(RecipeError, match=pattern):
        check([{"type": "hpo", **stage}])


# ------------------------------------------------------------------ searching
def test_search_prunes_keeps_best_and_resumes(tmp_path):
    state = make_state(tmp_path)
    space = {
        "finetune.lr": {"categorical": [1e-5, 3e-3, 1e-2]},
        "finetune.optimizer": {"categorical": ["sgd", "adam"]},
    }
    cfg = {
        "stages": [{"type": "finetune", "epochs": 3, "max_steps_per_epoch": 6}],
        "space": space,
        "n_trials": 6,
        "sampler": "random",
        "pruner": "median",
        "pruner_startup_trials": 2,
    }
    res = hpo(**cfg).run(state)
    d = res.details
    assert len(d["trials"]) == 6 and d["ran_here"] == 6
    c = d["counts"]
    assert c["complete"] + c["pruned"] == 6 and c["pruned"] >= 1 and c["running"] == 0
    pruned = [t for t in d["trials"] if t["state"] == "pruned"]
    assert all(t["epochs_reported"] < 3 for t in pruned)  # stopped before the last epoch
    # the kept model is the best trial's: its validation accuracy is the best value
    from compress_cli.runtime.measure import evaluate
    from compress_cli.runtime.runners import EagerRunner

    acc = evaluate(EagerRunner(state.model, state.device), state.data.loader("val"), state.data.get_task())[
        "accuracy"
    ]
    assert acc == pytest.approx(d["best"]["values"][0])
    assert max(t["values"][0] for t in d["trials"] if t["state"] == "complete") == d["best"]["values"][0]
    assert (
        state.edits.items[-1].op == "hpo"
        and state.edits.items[-1].details["best_trial"] == d["best"]["number"]
    )
    assert (tmp_path / "out" / "hpo-01.db").is_file()

    # resume: the same study gets 2 more trials; a fresh state re-runs the best trial's parameters
    state2 = make_state(tmp_path)
    res2 = hpo(**{**cfg, "n_trials": 8}).run(state2)
    d2 = res2.details
    assert d2["trials_before_this_run"] == 6 and d2["ran_here"] == 2 and len(d2["trials"]) == 8
    if d2["best"]["number"] < 6:  # found in the first run: re-run here, same seed, same model
        assert d2["best"]["re_run_here"] and "re-run here" in res2.notes
        acc2 = evaluate(
            EagerRunner(state2.model, state2.device), state2.data.loader("val"), state2.data.get_task()
        )["accuracy"]
        assert acc2 == pytest.approx(d2["best"]["values"][0])
    # a study that already has n_trials runs nothing more
    res3 = hpo(**{**cfg, "n_trials": 8}).run(make_state(tmp_path))
    assert res3.details["ran_here"] == 0 and res3.details["trials_before_this_run"] == 8


def badly_scaled(state):
    """The state with every weight times 1e4: SGD at lr 10 (the largest lr allowed) diverges to
    an inf/nan loss within 3 steps, lr 1e-2 trains."""
    with torch.no_grad():
        for p in state.model.parameters():
            p.mul_(1e4)
    return state


def test_failing_trials_are_marked_failed_and_the_search_goes_on(tmp_path):
    state = badly_scaled(make_state(tmp_path))
    space = {"finetune.lr": {"categorical": [10.0, 1e-2]}}  # 10 with SGD: the loss becomes nan
    res = hpo(
        stages=[{"type": "finetune", "epochs": 1, "max_steps_per_epoch": 4, "optimizer": "sgd"}],
        space=space,
        n_trials=4,
        sampler="random",
        pruner="none",
    ).run(state)
    rows = res.details["trials"]
    failed = [t for t in rows if t["state"] == "fail"]
    assert failed and all("loss became" in t["error"] for t in failed)
    assert all(t["params"]["finetune.lr"] == 10.0 for t in failed)
    assert res.details["counts"]["complete"] == 4 - len(failed) >= 1


def test_all_trials_failing_is_a_stage_error(tmp_path):
    state = badly_scaled(make_state(tmp_path))
    with pytest.raises(StageError, match=r"no trial completed \(0 pruned, 2 failed\); errors: .*loss became"):
        hpo(
            stages=[{"type": "finetune", "epochs": 1, "max_steps_per_epoch": 3, "optimizer": "sgd"}],
            space={"finetune.lr": {"categorical": [10.0]}},
            n_trials=2,
            pruner="none",
            storage="memory",
        ).run(state)


@pytest.mark.parametrize("how", ["keyboard", "sigterm"])
def test_interrupted_trial_is_marked_failed_not_running(tmp_path, monkeypatch, how):
    from compress_cli.hpo import search as hpo_search

    calls = []
    real = hpo_search.Search.objective_values

    def objective_values(self, sub):
        calls.append(1)
        if len(calls) == 2:
            if how == "keyboard":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)  # turned into KeyboardInterrupt during the search
        return real(self, sub)

    monkeypatch.setattr(hpo_search.Search, "objective_values", objective_values)
    previous = signal.getsignal(signal.SIGTERM)
    state = make_state(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        hpo(stages=[FT], space=LR, n_trials=5, pruner="none").run(state)
    assert signal.getsignal(signal.SIGTERM) == previous  # handler put back
    states = [t.state for t in study_trials(tmp_path)]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]


def test_multi_objective_reports_a_pareto_front(tmp_path):
    state = make_state(tmp_path)
    res = hpo(
        stages=[{"type": "finetune", "epochs": 1, "max_steps_per_epoch": 4}],
        space={
            "finetune.lr": {"float": [1e-3, 1e-1], "log": True},
            "finetune.l1": {"categorical": [0.0, 1e-3]},
        },
        objectives=["accuracy", "nonzero_params"],
        pruner="none",
        n_trials=4,
        sampler="random",
        storage="memory",
    ).run(state)
    d = res.details
    front = d["pareto_front"]
    assert front and d["objectives"] == {"accuracy": "maximize", "nonzero_params": "minimize"}
    complete = [t for t in d["trials"] if t["state"] == "complete"]
    for f in front:  # nobody dominates a front member
        assert not any(
            t["values"][0] >= f["values"][0]
            and t["values"][1] <= f["values"][1]
            and t["values"] != f["values"]
            for t in complete
        )
    assert d["best"]["values"][0] == max(f["values"][0] for f in front)
    assert "Pareto front" in res.notes


def test_trials_report_through_nested_training_and_leave_state_alone(tmp_path):
    state = make_state(tmp_path)
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    original_model = state.model
    res = hpo(stages=[FT], space=LR, n_trials=2, pruner="median", storage="memory").run(state)
    assert all(t["epochs_reported"] == 2 for t in res.details["trials"])  # one report per epoch
    assert state.model is not original_model  # the best trial's copy became the model
    assert all(torch.equal(before[k], v) for k, v in original_model.state_dict().items())  # copies trained
    assert state.ctx.epoch_callbacks == []


@pytest.mark.parametrize("sampler,pruner", [("cmaes", "median"), ("tpe", "hyperband"), ("random", "none")])
def test_samplers_and_pruners_run(tmp_path, sampler, pruner):
    state = make_state(tmp_path)
    res = hpo(
        stages=[FT],
        space={**LR, "finetune.epochs": {"int": [1, 2]}},
        n_trials=3,
        sampler=sampler,
        pruner=pruner,
        sampler_startup_trials=1,
        storage="memory",
    ).run(state)
    assert res.details["sampler"] == sampler and len(res.details["trials"]) == 3
    assert res.details["counts"]["complete"] >= 1


def test_timeout_alone_ends_the_search(tmp_path):
    state = make_state(tmp_path)
    res = hpo(stages=[FT], space=LR, n_trials=None, timeout_s=0.5, pruner="none", storage="memory").run(state)
    assert 1 <= len(res.details["trials"]) < 50


def test_first_trial_runs_the_configured_values(tmp_path):
    state = make_state(tmp_path)
    space = {
        "finetune.lr": {"float": [1e-3, 1e-1], "log": True},
        "finetune.optimizer": {"categorical": ["sgd", "adamw"]},  # the configured adam is not in it
        "finetune.epochs": {"int": [1, 2]},
    }
    res = hpo(stages=[{**FT, "lr": 0.02}], space=space, n_trials=2, pruner="none", storage="memory").run(
        state
    )
    first = res.details["trials"][0]
    assert first.get("defaults") is True
    assert first["params"]["finetune.lr"] == 0.02 and first["params"]["finetune.epochs"] == 2
    assert first["params"]["finetune.optimizer"] in ("sgd", "adamw")  # sampled: the default is outside
    res = hpo(stages=[FT], space=LR, n_trials=1, pruner="none", storage="memory", enqueue_defaults=False).run(
        make_state(tmp_path)
    )
    assert "defaults" not in res.details["trials"][0]
