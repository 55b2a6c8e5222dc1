"""``segmentation``: a class per pixel. Output ``(batch, classes, H, W)`` logits (torchvision's
segmentation models return ``{'out', 'aux'}``: ``out`` is picked by default), target ``(batch, H, W)``
integer masks (``(batch, 1, H, W)`` is accepted), pixels equal to ``task.kwargs.ignore_index``
(default 255, the PASCAL VOC border value) left out of loss and metrics.

Metrics from torchmetrics: pixel accuracy (``MulticlassAccuracy``, micro) and mIoU
(``MulticlassJaccardIndex``, macro). Both accumulate a confusion matrix over the whole split, so
mIoU is the data-set-level figure segmentation papers report, averaged over the classes that occur
in the predictions or the masks (torchmetrics' ``segmentation.MeanIoU`` averages per-image IoUs
instead, and has no ignore index).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from compress_cli.errors import RecipeError, SourceError
from compress_cli.tasks._metrics import quiet, shape, value
from compress_cli.tasks.base import Evaluator, Task
from compress_cli.tasks.registry import register_task

if TYPE_CHECKING:
    import torch


def masks(target: torch.Tensor) -> torch.Tensor:
    """``(batch, H, W)`` int64 masks from ``(batch, H, W)`` or ``(batch, 1, H, W)``."""
    if target.dim() == 4 and target.shape[1] == 1:
        target = target[:, 0]
    return target.long()


class SegmentationEvaluator(Evaluator):
    """Pixel accuracy, mIoU and the mean per-pixel cross-entropy over the non-ignored pixels."""

    def __init__(self, ignore_index: int | None) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.accuracy: Any = None
        self.iou: Any = None
        self.ce_sum = 0.0
        self.pixels = 0

    def update(self, pred: torch.Tensor, target: Any, reference: torch.Tensor | None) -> None:
        import torch.nn.functional as F
        from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

        t = masks(target)
        classes = int(pred.shape[1])
        if self.accuracy is None:
            kw: dict[str, Any] = {"num_classes": classes, "ignore_index": self.ignore_index}
            self.accuracy = MulticlassAccuracy(average="micro", **kw)
            self.iou = MulticlassJaccardIndex(average="macro", **kw)
        labels = pred.argmax(1)
        with quiet():
            self.accuracy.update(labels, t)
            self.iou.update(labels, t)
        ii = -100 if self.ignore_index is None else self.ignore_index
        self.ce_sum += float(F.cross_entropy(pred.float(), t, ignore_index=ii, reduction="sum"))
        self.pixels += int((t != ii).sum())
        self.samples += int(pred.shape[0])

    def compute(self) -> dict[str, float]:
        return {
            "miou": value(self.iou),
            "pixel_accuracy": value(self.accuracy),
            "loss": self.ce_sum / max(self.pixels, 1),
            "samples": self.samples,
        }


@register_task
class Segmentation(Task):
    """A class per pixel: ``(batch, classes, H, W)`` logits against ``(batch, H, W)`` integer masks.
    Loss: per-pixel cross-entropy (ignored pixels left out). Primary metric: mIoU."""

    name = "segmentation"
    primary = "miou"
    higher_is_better = True
    metrics = {
        "miou": "mean intersection-over-union over the classes present (predicted or true), "
        "from the split's confusion matrix",
        "pixel_accuracy": "share of the non-ignored pixels classified correctly",
        "loss": "mean per-pixel cross-entropy over the non-ignored pixels",
    }
    options = {"ignore_index": (255, "mask value left out of loss and metrics (null: none)")}

    def __init__(self, cfg: Any, num_classes: int | None = None):
        super().__init__(cfg, num_classes)
        ii = self.option("ignore_index")
        if ii is not None and (isinstance(ii, bool) or not isinstance(ii, int) or not -1 <= ii <= 65535):
            raise RecipeError(f"task.kwargs.ignore_index: must be an integer mask value or null (got {ii!r})")
        self.ignore_index: int | None = ii

    def loss(self, pred: torch.Tensor, target: Any, reference: torch.Tensor | None) -> torch.Tensor:
        import torch.nn.functional as F

        ii = -100 if self.ignore_index is None else self.ignore_index
        return F.cross_entropy(pred.float(), masks(target).to(pred.device), ignore_index=ii)

    def evaluator(self) -> Evaluator:
        return SegmentationEvaluator(self.ignore_index)

    def check_output(self, pred: torch.Tensor, target: Any) -> None:
        import torch

        super().check_output(pred, target)
        if pred.dim() != 4:
            raise SourceError(
                f"task segmentation: the model's output should be (batch, classes, H, W) logits, got "
                f"{shape(pred)}; pick another output with task.output (torchvision models: out)"
            )
        if not isinstance(target, torch.Tensor):
            raise SourceError(
                f"task segmentation: the target is a {type(target).__name__}, not a mask tensor; "
                "point task.target at the batch's masks"
            )
        if target.is_floating_point() or target.dtype == torch.bool:
            raise SourceError(
                f"task segmentation: the masks are {str(target.dtype).replace('torch.', '')}; they must "
                "hold integer class indices (in the data source use PILToTensor or torch.as_tensor, "
                "not ToTensor, which scales to 0..1)"
            )
        t = masks(target)
        n, classes, h, w = (int(d) for d in pred.shape)
        if t.dim() != 3 or t.shape[0] != n:
            raise SourceError(
                f"task segmentation: the masks should be (batch, H, W) = ({n}, {h}, {w}), got "
                f"{shape(target)}; point task.target at the masks"
            )
        if tuple(t.shape[1:]) != (h, w):
            raise SourceError(
                f"task segmentation: the model outputs {h}x{w} maps but the masks are "
                f"{t.shape[1]}x{t.shape[2]}; resize the masks in the data source (nearest) or "
                "upsample the logits in the model"
            )
        valid = t if self.ignore_index is None else t[t != self.ignore_index]
        if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= classes):
            raise SourceError(
                f"task segmentation: the masks hold class {int(valid.max())} (min {int(valid.min())}) "
                f"but the model outputs {classes} classes; set task.kwargs.ignore_index for the "
                "void value, or give the model as many classes as the masks have"
            )
        if self.num_classes is not None and classes != self.num_classes:
            raise SourceError(
                f"task segmentation: the model outputs {classes} classes but data.num_classes is "
                f"{self.num_classes}; set data.num_classes: {classes} or change the model's head"
            )
