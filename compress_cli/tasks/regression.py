"""``regression``: real-valued targets, MSE loss; metrics MSE, MAE and R² (torchmetrics'
``MeanSquaredError``, ``MeanAbsoluteError``, ``R2Score``, accumulated in float64).

The primary metric is R², higher is better: it is scale-free (1 = perfect, 0 = no better than
predicting the mean), so ``guard.max_metric_drop: 0.01`` means the same on any data set, and it is
what scikit-learn's regressors score by. MSE is in squared target units: a limit on it would have
to be chosen anew for every data set. ``task.primary: mse`` (or ``mae``) picks an error instead
(lower is better; the guard follows the direction).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from compress_cli.errors import SourceError, StageError
from compress_cli.tasks._metrics import shape
from compress_cli.tasks.base import Evaluator, Task
from compress_cli.tasks.registry import register_task

if TYPE_CHECKING:
    import torch


def aligned(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``pred`` and ``target`` as float ``(batch,)`` (one output) or ``(batch, outputs)`` tensors:
    ``(N, 1)`` and ``(N,)`` are the same thing; anything else must match element for element."""
    n = pred.shape[0]
    p, t = pred.float().reshape(n, -1), target.float().reshape(target.shape[0], -1)
    if p.shape != t.shape:
        raise StageError(
            f"task regression: the model's output {shape(pred)} does not match the target {shape(target)}"
        )
    return (p[:, 0], t[:, 0]) if p.shape[1] == 1 else (p, t)


class RegressionEvaluator(Evaluator):
    """MSE, MAE and R² (uniform average over outputs when there are several) over the split."""

    def __init__(self) -> None:
        super().__init__()
        self.mse: Any = None
        self.mae: Any = None
        self.r2: Any = None

    def update(self, pred: torch.Tensor, target: Any, reference: torch.Tensor | None) -> None:
        import torch
        from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError, R2Score

        p, t = aligned(pred, target)
        p, t = p.double(), t.double()
        if self.mse is None:
            self.mse, self.mae, self.r2 = MeanSquaredError(), MeanAbsoluteError(), R2Score()
            for m in (self.mse, self.mae, self.r2):
                m.set_dtype(torch.float64)  # sums of squares over a whole split
        self.mse.update(p, t)
        self.mae.update(p, t)
        self.r2.update(p, t)
        self.samples += int(pred.shape[0])

    def compute(self) -> dict[str, float]:
        from compress_cli.tasks._metrics import value

        if self.samples < 2:
            raise StageError("task regression: R² needs at least 2 evaluation samples")
        return {
            "mse": value(self.mse),
            "mae": value(self.mae),
            "r2": value(self.r2),
            "samples": self.samples,
        }


@register_task
class Regression(Task):
    """Real-valued targets (one value or a vector per sample); the output has as many values per
    sample as the target. Loss: mean squared error. Primary metric: R² (scale-free)."""

    name = "regression"
    primary = "r2"
    higher_is_better = True
    metrics = {
        "r2": "coefficient of determination R² (1 = perfect, 0 = predicting the mean; averaged over outputs)",
        "mse": "mean squared error, in squared target units",
        "mae": "mean absolute error, in target units",
    }
    options: ClassVar[dict[str, tuple[Any, str]] | None] = {}

    def loss(self, pred: torch.Tensor, target: Any, reference: torch.Tensor | None) -> torch.Tensor:
        import torch.nn.functional as F

        p, t = aligned(pred, target)
        return F.mse_loss(p, t.to(p.device))

    def evaluator(self) -> Evaluator:
        return RegressionEvaluator()

    def check_output(self, pred: torch.Tensor, target: Any) -> None:
        import torch

        super().check_output(pred, target)
        if not isinstance(target, torch.Tensor):
            raise SourceError(
                f"task regression: the target is a {type(target).__name__}, not a tensor; "
                "point task.target at the batch's numeric target"
            )
        if target.dtype == torch.bool or target.is_complex():
            raise SourceError(
                f"task regression: the target is {str(target.dtype).replace('torch.', '')}; "
                "regression needs real numbers (convert them in the data source)"
            )
        n = pred.shape[0]
        if target.shape[0] != n or pred[0].numel() != target[0].numel():
            raise SourceError(
                f"task regression: the model's output is {shape(pred)} but the target is "
                f"{shape(target)}; they need as many values per sample: pick the output with "
                "task.output, the target with task.target, or change the model's head"
            )
