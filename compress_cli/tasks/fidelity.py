"""``fidelity``: label-free, for any model. The reference is the original (uncompressed) model's
output on the same batch; a compressed model is scored by how close its output stays."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from compress_cli.tasks.base import Evaluator, Task
from compress_cli.tasks.registry import register_task

if TYPE_CHECKING:
    import torch

#: SQNR of an output equal to its reference (no error) is reported as this many dB
SQNR_CAP_DB = 200.0


def sqnr_db(signal: float, noise: float) -> float:
    """10·log10(signal energy / noise energy), capped at :data:`SQNR_CAP_DB`."""
    if noise <= 0:
        return SQNR_CAP_DB
    if signal <= 0:
        return -SQNR_CAP_DB
    return min(SQNR_CAP_DB, 10 * math.log10(signal / noise))


class FidelityEvaluator(Evaluator):
    """Mean per-sample cosine, SQNR and relative MSE over the whole split, and top-1 agreement
    when outputs are (batch, classes) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.cos_sum = 0.0
        self.signal = self.noise = 0.0
        self.agree = 0
        self.logits = True

    def update(self, pred: torch.Tensor, target: Any, reference: torch.Tensor | None) -> None:
        import torch.nn.functional as F

        assert reference is not None
        p = pred.float().reshape(pred.shape[0], -1)
        r = reference.float().reshape(reference.shape[0], -1)
        self.cos_sum += float(F.cosine_similarity(p, r, dim=1, eps=1e-12).sum())
        self.signal += float(r.double().pow(2).sum())
        self.noise += float((p.double() - r.double()).pow(2).sum())
        self.logits = self.logits and pred.dim() == 2 and pred.shape[1] > 1
        if self.logits:
            self.agree += int((pred.argmax(1) == reference.argmax(1)).sum())
        self.samples += int(pred.shape[0])

    def compute(self) -> dict[str, float]:
        n = self.samples
        res: dict[str, float] = {
            "cosine": self.cos_sum / n,
            "sqnr_db": sqnr_db(self.signal, self.noise),
            "relative_mse": self.noise / self.signal if self.signal > 0 else 0.0,
        }
        if self.logits:
            res["agreement"] = self.agree / n
        res["samples"] = n
        return res


def distance_loss(pred: torch.Tensor, reference: torch.Tensor, kind: str) -> torch.Tensor:
    """Training loss pulling ``pred`` towards ``reference``: ``mse``, ``cosine`` (1 − cos) or
    ``kl`` (softened logits, temperature 1)."""
    import torch.nn.functional as F

    if kind == "cosine":
        p, r = pred.reshape(pred.shape[0], -1), reference.reshape(reference.shape[0], -1)
        return (1 - F.cosine_similarity(p, r, dim=1)).mean()
    if kind == "kl":
        return F.kl_div(
            F.log_softmax(pred, -1), F.log_softmax(reference, -1), log_target=True, reduction="batchmean"
        )
    return F.mse_loss(pred, reference)


@register_task
class Fidelity(Task):
    """Label-free: every metric compares the model's selected output with the original model's on
    the same batch. Loss: distance to the original's output (``task.kwargs.loss``: mse | cosine |
    kl), so finetune and distill work without labels. Primary metric: cosine similarity."""

    name = "fidelity"
    primary = "cosine"
    higher_is_better = True
    needs_labels = False
    needs_reference = True
    metrics = {
        "cosine": "mean cosine similarity of each sample's output to the original's (1 = identical)",
        "sqnr_db": f"signal-to-quantisation-noise ratio of the outputs in dB (capped at {SQNR_CAP_DB:g})",
        "relative_mse": "squared error / squared original output, summed over the split",
        "agreement": "share of samples whose top-1 class matches the original's (logit outputs only)",
    }
    LOSSES = ("mse", "cosine", "kl")
    options = {"loss": ("mse", "training loss against the original's output: mse | cosine | kl")}

    def __init__(self, cfg: Any, num_classes: int | None = None):
        super().__init__(cfg, num_classes)
        kind = self.option("loss")
        if kind not in self.LOSSES:
            from compress_cli.errors import RecipeError

            raise RecipeError(f"task.kwargs.loss: must be one of {', '.join(self.LOSSES)} (got {kind!r})")
        self.loss_kind = kind

    def loss(self, pred: torch.Tensor, target: Any, reference: torch.Tensor | None) -> torch.Tensor:
        assert reference is not None
        return distance_loss(pred.float(), reference.float(), self.loss_kind)

    def evaluator(self) -> Evaluator:
        return FidelityEvaluator()

    def check_output(self, pred: torch.Tensor, target: Any) -> None:
        return None  # any tensor output can be compared with the original's
