"""What every training stage shares: ``TrainOptions`` (a pydantic mixin for stage configs), the
``TrainResult`` a ``train`` call returns, and the optimizer, schedule and L1 factories."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from compress_cli.config.bounds import (
    MAX_EPOCHS,
    MAX_PENALTY,
    MAX_STEPS,
    BatchSize,
    Epoch,
    LearningRate,
)

if TYPE_CHECKING:
    import torch
    from torch import nn


class TrainOptions(BaseModel):
    """Training options shared by every stage that trains (mixed into their configs)."""

    epochs: int = Field(1, ge=0, le=MAX_EPOCHS, description="passes over the training split")
    lr: LearningRate | Literal["auto"] = Field(0.01, description="learning rate, or 'auto' (from lr_find)")
    optimizer: Literal["sgd", "adam", "adamw"] = Field("adam", description="optimizer")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    nesterov: bool = Field(False, description="SGD Nesterov momentum")
    weight_decay: float = Field(0.0, ge=0, le=MAX_PENALTY, description="L2 penalty (decoupled for adamw)")
    l1: float = Field(0.0, ge=0, le=MAX_PENALTY, description="L1 penalty on weights of conv/linear layers")
    batch_size: BatchSize | Literal["auto"] | None = Field(
        None, description="training batch (default: data.batch_size; 'auto' from batch_size_find)"
    )
    scheduler: Literal["none", "step", "multistep", "exponential", "cosine", "onecycle", "plateau"] = Field(
        "none", description="learning-rate decay"
    )
    step_size: int = Field(1, gt=0, le=MAX_EPOCHS, description="step: epochs between decays")
    milestones: list[Epoch] = Field(default_factory=list, description="multistep: epochs at which lr decays")
    gamma: float = Field(0.1, gt=0, le=1, description="step/multistep/exponential/plateau decay factor")
    warmup_epochs: float = Field(
        0.0, ge=0, le=MAX_EPOCHS, description="linear warm-up from lr/100 (fractions allowed)"
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=1, description="cross-entropy label smoothing (classification task only)"
    )
    grad_clip: float | None = Field(None, gt=0, le=1e6, description="clip the gradient norm to this value")
    early_stopping: int | None = Field(
        None,
        gt=0,
        le=MAX_EPOCHS,
        description="stop after N epochs without a gain in the task's primary validation metric "
        "(val accuracy for classification); best weights restored",
    )
    amp: bool = Field(True, description="mixed precision on CUDA (ignored on CPU)")
    max_steps_per_epoch: int | None = Field(
        None, gt=0, le=MAX_STEPS, description="cap steps per epoch (quick runs)"
    )
    checkpoint_every_s: float = Field(
        600.0,
        ge=1,
        le=86400,
        description="seconds between mid-epoch checkpoints (one is also written after every epoch); "
        "--resume continues the stage from the last",
    )


@dataclass
class TrainResult:
    """What one ``train`` call did: epochs run, per-epoch history, the best validation score.

    ``best_val_score`` is the best value of the task's primary metric (in its direction);
    ``best_val_accuracy`` the same for classification (None for other tasks, whose primary metric
    ``val_metric`` names)."""

    epochs_run: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_val_accuracy: float | None = None
    stopped_early: bool = False
    seconds: float = 0.0
    best_val_score: float | None = None
    val_metric: str | None = None
    #: mixed precision: "amp bf16", "amp fp16 with GradScaler" (CUDA), why it was ignored, or ""
    amp: str = ""

    def notes(self, *parts: str) -> str:
        """A training stage's one-line notes: epochs run, then ``parts``, the mixed precision used
        (or why it was ignored), the last validation score (accuracy in %, another task's primary
        metric by name) and whether early stopping restored the best weights."""
        last = self.history[-1] if self.history else {}
        notes = ", ".join([f"{self.epochs_run} epoch(s)", *parts, *([self.amp] if self.amp else [])])
        if "val_accuracy" in last:
            notes += f", val {last['val_accuracy'] * 100:.2f}%"
        elif "val_score" in last and self.val_metric:
            notes += f", val {self.val_metric} {last['val_score']:.4g}"
        if self.stopped_early:
            notes += ", stopped early (best weights restored)"
        return notes

    def summary(self) -> dict[str, Any]:
        """The result as report details (history included); tasks other than classification add
        ``best_val_score`` and ``val_metric``."""
        out: dict[str, Any] = {
            "epochs_run": self.epochs_run,
            "best_val_accuracy": self.best_val_accuracy,
        }
        if self.val_metric is not None:
            out["best_val_score"] = self.best_val_score
            out["val_metric"] = self.val_metric
        out.update(
            {
                "stopped_early": self.stopped_early,
                "train_seconds": round(self.seconds, 3),
                "history": self.history,
            }
        )
        return out


#: (selected output, model inputs, target or None) -> loss; replaces the task's loss (distillation)
LossFn = Callable[["torch.Tensor", Any, Any], "torch.Tensor"]
#: (global step, batch loss, optimizer) -> True to stop training; the loss is averaged over ranks
StepHook = Callable[[int, float, "torch.optim.Optimizer"], "bool | None"]


def make_optimizer(params: Any, opts: TrainOptions, lr: float) -> torch.optim.Optimizer:
    """The SGD, Adam or AdamW optimizer ``opts`` names over ``params`` at ``lr``, with its weight decay
    (and for SGD its momentum; Nesterov only with a nonzero momentum)."""
    import torch

    if opts.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=lr,
            momentum=opts.momentum,
            nesterov=opts.nesterov and opts.momentum > 0,
            weight_decay=opts.weight_decay,
        )
    if opts.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=opts.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=opts.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, opts: TrainOptions, lr: float, steps_per_epoch: int) -> Any:
    """A per-step scheduler (warm-up composed with the decay); plateau is stepped per epoch."""
    import torch
    from torch.optim import lr_scheduler as S

    total = max(1, opts.epochs * steps_per_epoch)
    warm = int(round(opts.warmup_epochs * steps_per_epoch))
    spe = max(1, steps_per_epoch)
    s = opts.scheduler
    if s == "onecycle":
        return S.OneCycleLR(
            opt, max_lr=lr, total_steps=total, pct_start=max(0.05, min(0.5, warm / total or 0.3))
        )
    if s == "step":
        main: Any = S.StepLR(opt, step_size=opts.step_size * spe, gamma=opts.gamma)
    elif s == "multistep":
        main = S.MultiStepLR(opt, milestones=[m * spe for m in opts.milestones], gamma=opts.gamma)
    elif s == "exponential":
        main = S.ExponentialLR(opt, gamma=opts.gamma ** (1 / spe))
    elif s == "cosine":
        main = S.CosineAnnealingLR(opt, T_max=max(1, total - warm))
    else:
        main = None
    if warm > 0:
        w = S.LinearLR(opt, start_factor=0.01, end_factor=1.0, total_iters=warm)
        if main is None:
            return w
        return S.SequentialLR(opt, [w, main], milestones=[warm])
    del torch
    return main


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of the absolute weights of every Linear and Conv1d/2d/3d layer (training scales it by
    ``l1``); a zero scalar for a model without one."""
    from torch import nn

    terms = [
        m.weight.abs().sum()
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
    ]
    return sum(terms) if terms else next(model.parameters()).new_zeros(())  # type: ignore[return-value]
