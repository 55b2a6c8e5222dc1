"""``classification`` (the default): integer class labels, logits out, cross-entropy, top-1/top-5."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from compress_cli.errors import SourceError
from compress_cli.tasks.base import Evaluator, Task
from compress_cli.tasks.registry import register_task

if TYPE_CHECKING:
    import torch


class ClassificationEvaluator(Evaluator):
    """top-1 (and top-5 when more than 5 classes) accuracy as fractions, and mean cross-entropy."""

    def __init__(self, num_classes: int | None):
        super().__init__()
        self.num_classes = num_classes or 0
        self.correct1 = self.correct5 = 0
        self.loss_sum = 0.0

    def update(self, pred: torch.Tensor, target: Any, reference: torch.Tensor | None) -> None:
        import torch.nn.functional as F

        self.loss_sum += float(F.cross_entropy(pred, target, reduction="sum"))
        self.correct1 += int((pred.argmax(1) == target).sum())
        if self.num_classes > 5:
            self.correct5 += int((pred.topk(5, dim=1).indices == target[:, None]).any(1).sum())
        self.samples += len(target)

    def compute(self) -> dict[str, float]:
        n = self.samples
        res: dict[str, float] = {"accuracy": self.correct1 / n, "loss": self.loss_sum / n, "samples": n}
        if self.num_classes > 5:
            res["top5"] = self.correct5 / n
        return res


@register_task
class Classification(Task):
    """Integer class labels; the output is ``(batch, classes)`` logits (``task.output`` picks them
    from a dict or tuple). Loss: cross-entropy. Primary metric: top-1 accuracy."""

    name = "classification"
    primary = "accuracy"
    higher_is_better = True
    metrics = {
        "accuracy": "top-1 accuracy, fraction 0..1",
        "top5": "top-5 accuracy (only with more than 5 classes)",
        "loss": "mean cross-entropy",
    }
    options: ClassVar[dict[str, tuple[Any, str]] | None] = {}

    #: (model classes, data classes) -> the way out of a mismatch, naming the sources' recipe keys
    classes_hint: Callable[[int, int], str] | None = None

    def loss(self, pred: torch.Tensor, target: Any, reference: torch.Tensor | None) -> torch.Tensor:
        import torch.nn.functional as F

        return F.cross_entropy(pred, target)

    def evaluator(self) -> Evaluator:
        return ClassificationEvaluator(self.num_classes)

    def check_output(self, pred: torch.Tensor, target: Any) -> None:
        super().check_output(pred, target)
        if pred.dim() != 2:
            raise SourceError(
                f"task classification: the model's output should be (batch, classes) logits, got "
                f"{list(pred.shape)}; pick another output with task.output, or use task: fidelity"
            )
        if self.num_classes is not None and pred.shape[1] != self.num_classes:
            model_n, data_n = int(pred.shape[1]), int(self.num_classes)
            hint = self.classes_hint or (lambda m, n: f"set model.kwargs.num_classes: {n}")
            raise SourceError(
                f"model outputs {model_n} classes but the data has {data_n}: {hint(model_n, data_n)}"
            )

    def report_fields(self, scores: dict[str, float]) -> dict[str, Any]:
        # flat, as reports have always had them (accuracy, loss, samples, top5)
        return {k: (int(v) if k == "samples" else v) for k, v in scores.items()}
