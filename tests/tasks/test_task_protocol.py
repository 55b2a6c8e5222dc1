"""The task protocol around the metrics: batch splitting and output selection for dict / tuple
batches and dict / tuple / ModelOutput-like outputs, metric directions, report fields, located
check_output errors, and build_task's errors (unknown type, bad primary, bad kwargs, custom)."""

from __future__ import annotations

import sys
import types
from collections import OrderedDict

import pytest
import torch

from compress_cli.config.recipe import TaskConfig
from compress_cli.errors import RecipeError, SourceError, StageError
from compress_cli.stages.registry import load_recipe
from compress_cli.tasks import Task, build_task
from compress_cli.testing import WithinBins


def task(type_: str = "classification", num_classes: int | None = None, **cfg) -> Task:
    return build_task(TaskConfig(type=type_, **cfg), num_classes)


class Output(OrderedDict):
    """Like transformers' ModelOutput: a mapping whose items are attributes too."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


IDS = torch.tensor([[5, 6, 7], [8, 9, 0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
LABELS = torch.tensor([1, 0])


def test_split_dict_batches():
    batch = {"input_ids": IDS, "attention_mask": MASK, "labels": LABELS}
    inputs, target = task().split(batch)
    assert list(inputs) == ["input_ids", "attention_mask"] and target is LABELS
    inputs, target = task(inputs=["input_ids"], target="attention_mask").split(batch)
    assert list(inputs) == ["input_ids"] and target is MASK
    inputs, target = task("fidelity").split({"input_ids": IDS})  # unlabelled
    assert list(inputs) == ["input_ids"] and target is None
    with pytest.raises(SourceError, match="task.target: the batch has no key 'score'"):
        task(target="score").split(batch)
    with pytest.raises(SourceError, match="task.inputs: the batch has no key 'pixel_values'"):
        task(inputs=["pixel_values"]).split(batch)


def test_split_tuple_and_tensor_batches():
    x, m, y = torch.zeros(2, 3), torch.ones(2, 3), LABELS
    inputs, target = task().split((x, m, y))
    assert isinstance(inputs, tuple) and inputs[0] is x and inputs[1] is m and target is y
    inputs, target = task(inputs=[1], target=0).split([x, m, y])
    assert inputs is m and target is x
    assert task("fidelity").split(x) == (x, None)
    inputs, target = task("fidelity").split([x])  # TensorDataset(x): a one-element list
    assert inputs is x and target is None
    with pytest.raises(SourceError, match="task.target: 5 is not a position of a 3-element batch"):
        task(target=5).split((x, m, y))


def test_select_tensor_tuple_dict_and_model_output():
    logits, hidden = torch.randn(2, 3), torch.randn(2, 3, 4)
    t = task()
    assert t.select(logits) is logits
    assert t.select((logits, hidden)) is logits  # first element of a tuple
    assert t.select(Output(last_hidden_state=hidden, logits=logits)) is logits  # logits first
    assert task(output=1).select((logits, hidden)) is hidden
    assert task(output="last_hidden_state").select(Output(last_hidden_state=hidden)) is hidden
    seg = {"out": torch.randn(1, 2, 4, 4), "aux": torch.randn(1, 2, 4, 4)}  # torchvision segmentation
    assert task("segmentation").select(seg) is seg["out"]
    with pytest.raises(StageError, match=r"task.output: the model's output has no 'pooler_output' \(keys"):
        task(output="pooler_output").select({"logits": logits})
    with pytest.raises(StageError, match="task.output: 2 is not an index"):
        task(output=2).select((logits, hidden))


def test_select_pooling_and_normalize():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    out = Output(last_hidden_state=hidden)
    inputs = {"input_ids": IDS[:1], "attention_mask": torch.tensor([[1, 1, 0]])}
    # mean over the unmasked tokens only: ([1, 2] + [3, 4]) / 2
    assert task("embedding", output="mean_pool").select(out, inputs).tolist() == [[2.0, 3.0]]
    assert task("embedding", output="cls").select(out, inputs).tolist() == [[1.0, 2.0]]
    v = task("embedding", output="cls", normalize=True).select(out, inputs)
    assert v[0].tolist() == pytest.approx([1 / 5**0.5, 2 / 5**0.5])
    with pytest.raises(StageError, match=r"mean_pool needs \(batch, tokens, features\)"):
        task("embedding", output="mean_pool").select(torch.randn(2, 3))


def test_forward_calls_with_keywords_and_selects():
    class DictModel(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return Output(logits=(input_ids * attention_mask).float().sum(1, keepdim=True))

    pred = task().forward(DictModel(), {"input_ids": IDS, "attention_mask": MASK})
    assert pred.tolist() == [[18.0], [17.0]]


@pytest.mark.parametrize(
    ("metric", "higher"),
    [
        ("accuracy", True),
        ("r2", True),
        ("map", True),
        ("f1", True),
        ("miou", True),
        ("pixel_accuracy", True),
        ("cosine", True),
        ("spearman", True),
        ("sqnr_db", True),
        ("mse", False),
        ("mae", False),
        ("loss", False),
        ("relative_mse", False),
    ],
)
def test_direction(metric, higher):
    assert Task.direction(metric) is higher


def test_primary_and_direction_follow_task_primary():
    t = task("regression")
    assert (t.primary, t.higher_is_better) == ("r2", True)
    t = task("regression", primary="mse")
    assert (t.primary, t.higher_is_better) == ("mse", False)
    t = task("segmentation", primary="loss")
    assert (t.primary, t.higher_is_better) == ("loss", False)


def test_report_fields():
    scores = {"mse": 0.5, "mae": 0.25, "r2": 0.9, "samples": 8}
    assert task("regression").report_fields(scores) == {
        "task": "regression",
        "primary": "r2",
        "higher_is_better": True,
        "score": 0.9,
        "scores": {"mse": 0.5, "mae": 0.25, "r2": 0.9},
        "samples": 8,
    }
    fields = task("regression", primary="mae").report_fields(scores)
    assert (fields["primary"], fields["score"], fields["higher_is_better"]) == ("mae", 0.25, False)
    # classification keeps the flat fields reports have always had
    flat = task("classification").report_fields({"accuracy": 0.5, "loss": 1.0, "samples": 4.0})
    assert flat == {"accuracy": 0.5, "loss": 1.0, "samples": 4}
    with pytest.raises(StageError, match="task.primary: fidelity measured no 'agreement'"):
        task("fidelity", primary="agreement").report_fields({"cosine": 1.0, "samples": 2})


def test_check_output_errors_name_the_key_to_change():
    pred = torch.randn(4, 3)
    with pytest.raises(SourceError, match="needs labels .* task: fidelity"):
        task("regression").check_output(pred, None)
    with pytest.raises(SourceError, match=r"output is \(4, 3\) but the target is \(4\).*task\.output"):
        task("regression").check_output(pred, torch.randn(4))
    with pytest.raises(SourceError, match="the target is bool; regression needs real numbers"):
        task("regression").check_output(pred[:, :1], torch.ones(4, dtype=torch.bool))
    task("regression").check_output(pred[:, :1], torch.randn(4))  # (N, 1) against (N,) is fine

    with pytest.raises(SourceError, match=r"target should be \(batch, labels\) = \(4, 3\).*task.target"):
        task("multilabel").check_output(pred, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(SourceError, match="values other than 0 and 1"):
        task("multilabel").check_output(pred, torch.full((4, 3), 2))
    with pytest.raises(SourceError, match="outputs 3 labels but data.num_classes is 5"):
        task("multilabel", 5).check_output(pred, torch.zeros(4, 3))

    logits = torch.randn(2, 3, 4, 4)
    with pytest.raises(SourceError, match=r"\(batch, classes, H, W\).*task.output"):
        task("segmentation").check_output(pred, torch.zeros(4, 4, 4, dtype=torch.long))
    with pytest.raises(SourceError, match="masks are float32; .* PILToTensor"):
        task("segmentation").check_output(logits, torch.zeros(2, 4, 4))
    with pytest.raises(SourceError, match="outputs 4x4 maps but the masks are 8x8"):
        task("segmentation").check_output(logits, torch.zeros(2, 8, 8, dtype=torch.long))
    masks = torch.zeros(2, 4, 4, dtype=torch.long)
    masks[0, 0, 0] = 7
    with pytest.raises(SourceError, match="masks hold class 7 .* task.kwargs.ignore_index"):
        task("segmentation").check_output(logits, masks)
    masks[0, 0, 0] = 255  # the default ignore_index
    task("segmentation").check_output(logits, masks)
    task("segmentation").check_output(logits, masks[:, None])  # (N, 1, H, W)

    with pytest.raises(SourceError, match="task.output: mean_pool"):
        task("embedding").check_output(torch.randn(2, 5, 8), None)
    with pytest.raises(SourceError, match="one score per sample .* task.target"):
        task("embedding", kwargs={"pair_scores": True}).check_output(torch.randn(2, 8), None)
    task("embedding").check_output(torch.randn(2, 8), LABELS)  # targets ignored without pair_scores


def test_build_task_errors(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nname: r\nmodel: {source: zoo:digits_mlp}\ntask: regresion\nstages: []\n")
    with pytest.raises(RecipeError, match=r"unknown task 'regresion' \(did you mean 'regression'\?\)"):
        load_recipe(recipe)
    with pytest.raises(RecipeError, match=r"task.primary: regression has no metric 'accuracy' \(metrics: r2"):
        task("regression", primary="accuracy")
    with pytest.raises(RecipeError, match=r"segmentation takes only ignore_index \(got ignore\)"):
        task("segmentation", kwargs={"ignore": 0})
    with pytest.raises(RecipeError, match="task.kwargs: regression takes no kwargs"):
        task("regression", kwargs={"threshold": 0.5})
    with pytest.raises(RecipeError, match="task.kwargs.threshold: must be a probability"):
        task("multilabel", kwargs={"threshold": 1.5})
    with pytest.raises(RecipeError, match="task.kwargs.loss: must be one of mse, cosine, kl"):
        task("fidelity", kwargs={"loss": "l1"})
    with pytest.raises(RecipeError, match="task.primary: spearman needs task.kwargs.pair_scores"):
        task("embedding", primary="spearman")


@pytest.fixture
def plugin_module(monkeypatch):
    """An importable module ``h4_task_plugins`` holding task factories, good and bad."""
    module = types.ModuleType("h4_task_plugins")

    class Halfway:
        name, primary = "halfway", "x"

    def broken(cfg, num_classes):
        raise ValueError("no such head")

    module.halfway = lambda cfg, num_classes: Halfway()
    module.broken = broken
    module.within = WithinBins  # a class is a factory: WithinBins(cfg, num_classes)
    monkeypatch.setitem(sys.modules, "h4_task_plugins", module)
    return module


def test_custom_task_source(plugin_module):
    t = task("custom", 10, source="h4_task_plugins:within", kwargs={"tolerance": 2})
    assert (t.name, t.primary, t.higher_is_better, t.reference) == ("within_bins", "within", True, None)
    ev = t.evaluator()
    ev.update(torch.eye(10)[[0, 3, 9]], torch.tensor([2, 0, 9]), None)  # off by 2, 3, 0
    assert ev.compute() == {"within": 2 / 3, "accuracy": 1 / 3, "samples": 3}
    with pytest.raises(RecipeError, match="lacks higher_is_better, .* subclass compress_cli.tasks.Task"):
        task("custom", source="h4_task_plugins:halfway")
    with pytest.raises(RecipeError, match="building the task failed: ValueError: no such head"):
        task("custom", source="h4_task_plugins:broken")
    with pytest.raises(RecipeError, match=r"has no callable 'withn' \(did you mean 'within'\?\)"):
        task("custom", source="h4_task_plugins:withn")
    with pytest.raises(RecipeError, match="task.source .*cannot import 'h4_no_such_module'"):
        task("custom", source="h4_no_such_module:make")
    with pytest.raises(RecipeError, match="task.kwargs: within_bins takes only tolerance"):
        task("custom", source="h4_task_plugins:within", kwargs={"tolerence": 1})
