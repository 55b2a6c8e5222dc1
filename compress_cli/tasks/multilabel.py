"""``multilabel``: any number of labels per sample, a ``(batch, labels)`` target of 0/1, one logit
per label out. Loss: binary cross-entropy on the logits. Metrics from torchmetrics
(``MultilabelAveragePrecision``, exact, no binning; ``MultilabelF1Score``) on the sigmoid of the
logits (always applied here: torchmetrics' own guess, "logits when outside [0, 1]", is per batch).

Macro averages run over the labels with at least one positive in the split: a label the split
never has has no defined average precision (torchmetrics would count it as 0 and drag mAP down
by a label the data cannot judge).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from compress_cli.errors import RecipeError, SourceError, StageError
from compress_cli.tasks._metrics import quiet, shape
from compress_cli.tasks.base import Evaluator, Task
from compress_cli.tasks.registry import register_task

if TYPE_CHECKING:
    import torch


class MultilabelEvaluator(Evaluator):
    """Per-label AP and F1 (torchmetrics, ``average=None``), macro-averaged over the labels with a
    positive; mean BCE per label."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold
        self.ap: Any = None
        self.f1: Any = None
        self.positives: torch.Tensor | None = None
        self.bce_sum = 0.0

    def update(self, pred: torch.Tensor, target: Any, reference: torch.Tensor | None) -> None:
        import torch.nn.functional as F
        from torchmetrics.classification import MultilabelAveragePrecision, MultilabelF1Score

        labels = int(pred.shape[1])
        t = target.reshape(pred.shape).long()
        if self.ap is None:
            self.ap = MultilabelAveragePrecision(num_labels=labels, average=None, thresholds=None)
            self.f1 = MultilabelF1Score(num_labels=labels, threshold=self.threshold, average=None)
            self.positives = t.new_zeros(labels)
        probs = pred.float().sigmoid()
        with quiet():
            self.ap.update(probs, t)
            self.f1.update(probs, t)
        assert self.positives is not None
        self.positives += t.sum(0)
        self.bce_sum += float(F.binary_cross_entropy_with_logits(pred.float(), t.float(), reduction="sum"))
        self.samples += int(pred.shape[0])

    def compute(self) -> dict[str, float]:
        assert self.positives is not None
        present = self.positives > 0
        if not bool(present.any()):
            raise StageError(
                "task multilabel: no label has a positive sample in the evaluation split; "
                "mAP and F1 are undefined (check the targets and task.target)"
            )
        with quiet():
            ap, f1 = self.ap.compute(), self.f1.compute()
        return {
            "map": float(ap[present].mean()),
            "f1": float(f1[present].mean()),
            "loss": self.bce_sum / (self.samples * len(present)),
            "samples": self.samples,
        }


@register_task
class Multilabel(Task):
    """Several labels per sample: the target is ``(batch, labels)`` of 0/1, the output one logit
    per label. Loss: binary cross-entropy with logits. Primary metric: mAP (macro average
    precision)."""

    name = "multilabel"
    primary = "map"
    higher_is_better = True
    metrics = {
        "map": "mean over labels of the average precision (area under precision-recall), labels "
        "with a positive in the split",
        "f1": "mean over labels of F1 at task.kwargs.threshold on the sigmoid of the logits",
        "loss": "mean binary cross-entropy per sample and label",
    }
    options = {"threshold": (0.5, "probability (sigmoid of the logit) above which a label is predicted")}

    def __init__(self, cfg: Any, num_classes: int | None = None):
        super().__init__(cfg, num_classes)
        t = self.option("threshold")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < 1:
            raise RecipeError(f"task.kwargs.threshold: must be a probability between 0 and 1 (got {t!r})")
        self.threshold = float(t)

    def loss(self, pred: torch.Tensor, target: Any, reference: torch.Tensor | None) -> torch.Tensor:
        import torch.nn.functional as F

        return F.binary_cross_entropy_with_logits(pred.float(), target.reshape(pred.shape).to(pred).float())

    def evaluator(self) -> Evaluator:
        return MultilabelEvaluator(self.threshold)

    def check_output(self, pred: torch.Tensor, target: Any) -> None:
        import torch

        super().check_output(pred, target)
        if pred.dim() != 2:
            raise SourceError(
                f"task multilabel: the model's output should be (batch, labels) logits, got {shape(pred)}; "
                "pick another output with task.output"
            )
        if not isinstance(target, torch.Tensor) or target.shape != pred.shape:
            raise SourceError(
                f"task multilabel: the target should be (batch, labels) = {shape(pred)} of 0/1 like the "
                f"model's output, got {shape(target)}; point task.target at the label matrix, or give "
                "the model one logit per label"
            )
        if bool(((target != 0) & (target != 1)).any()):
            raise SourceError(
                "task multilabel: the target holds values other than 0 and 1; it must be a 0/1 "
                "indicator matrix (one column per label), not class indices or soft scores"
            )
        if self.num_classes is not None and pred.shape[1] != self.num_classes:
            raise SourceError(
                f"task multilabel: the model outputs {pred.shape[1]} labels but data.num_classes is "
                f"{self.num_classes}; set data.num_classes: {pred.shape[1]} or change the model's head"
            )
