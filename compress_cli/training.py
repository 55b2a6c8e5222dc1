"""THE training loop. finetune, distill, QAT, pruning schedules and HPO trials all call ``train``.

Options every training stage shares live in ``TrainOptions`` (a pydantic mixin for stage configs):
optimizer, lr (or ``auto``), schedules with warm-up, weight decay and L1, label smoothing, gradient
clipping, early stopping on validation accuracy (restores the best weights), AMP on CUDA.
"""

from __future__ import annotations

import copy
import math
import time
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
from compress_cli.errors import StageError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from compress_cli.state import State


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
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing")
    grad_clip: float | None = Field(None, gt=0, le=1e6, description="clip the gradient norm to this value")
    early_stopping: int | None = Field(
        None,
        gt=0,
        le=MAX_EPOCHS,
        description="stop after N epochs without val-accuracy gain; best weights restored",
    )
    amp: bool = Field(True, description="mixed precision on CUDA (ignored on CPU)")
    max_steps_per_epoch: int | None = Field(
        None, gt=0, le=MAX_STEPS, description="cap steps per epoch (quick runs)"
    )


@dataclass
class TrainResult:
    """What one ``train`` call did: epochs run, per-epoch history, best validation accuracy."""

    epochs_run: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_val_accuracy: float | None = None
    stopped_early: bool = False
    seconds: float = 0.0

    def notes(self, *parts: str) -> str:
        """A training stage's one-line notes: epochs run, then ``parts``, the last validation
        accuracy and whether early stopping restored the best weights."""
        last = self.history[-1] if self.history else {}
        notes = ", ".join([f"{self.epochs_run} epoch(s)", *parts])
        if "val_accuracy" in last:
            notes += f", val {last['val_accuracy'] * 100:.2f}%"
        if self.stopped_early:
            notes += ", stopped early (best weights restored)"
        return notes

    def summary(self) -> dict[str, Any]:
        """The result as report details (history included)."""
        return {
            "epochs_run": self.epochs_run,
            "best_val_accuracy": self.best_val_accuracy,
            "stopped_early": self.stopped_early,
            "train_seconds": round(self.seconds, 3),
            "history": self.history,
        }


LossFn = Callable[["torch.Tensor", "torch.Tensor", "torch.Tensor"], "torch.Tensor"]  # (logits, x, y) -> loss
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


def _amp_context(device: torch.device, enabled: bool) -> tuple[Any, Any]:
    import contextlib

    import torch

    if not enabled or device.type != "cuda":
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


def train(
    model: nn.Module,
    state: State,
    opts: TrainOptions,
    *,
    loss_fn: LossFn | None = None,
    extra_params: list[Any] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    after_step: Callable[[], None] | None = None,
    on_step: StepHook | None = None,
    loader: Any = None,
    distributed: bool = True,
    label: str = "train",
    validate: bool = True,
) -> TrainResult:
    """Train ``model`` in place on ``state.data``'s training split.

    ``loss_fn(logits, x, y)`` replaces cross-entropy (distillation); ``on_epoch(epoch, metrics)``
    sees validation metrics after each epoch (HPO pruners raise from it), then each of
    ``state.ctx.epoch_callbacks``; ``after_step`` runs after every optimizer step; ``on_step(step, loss,
    optimizer)`` too, with the step's loss as a float (a device sync, so only when given), and
    returning True ends training after that step (the lr range test steers the lr and stops on
    divergence this way). ``loader`` replaces the training split's loader (probes).

    Under torchrun (see ``distributed.py``) the model is wrapped in DistributedDataParallel, the
    training split is sharded with a DistributedSampler, and the loss, validation metrics and stop
    decisions are reduced over ranks so every rank takes the same path. ``distributed=False`` trains
    this process's copy alone (a probe that one rank runs while the others wait).
    """
    import torch
    import torch.nn.functional as F

    from compress_cli.runtime import distributed as dist_

    device = state.device
    ddp = distributed and dist_.active()
    lr = float(state.resolve(opts.lr, "lr"))
    bs = state.resolve(opts.batch_size, "batch_size") if opts.batch_size is not None else None
    sampler = None
    if loader is None:
        sampler = dist_.train_sampler(state.data.train_dataset, state.data.seed) if ddp else None
        loader = state.data.loader("train", batch_size=bs, sampler=sampler)
    steps = len(loader) if opts.max_steps_per_epoch is None else min(len(loader), opts.max_steps_per_epoch)
    result = TrainResult()
    if opts.epochs == 0 or steps == 0:
        return result
    model.to(device)
    net = dist_.wrap_ddp(model, device) if ddp else model
    extra_sync = [p for p in (extra_params or []) if isinstance(p, torch.Tensor)] if ddp else []
    params = [p for p in model.parameters() if p.requires_grad] + list(extra_params or [])
    opt = make_optimizer(params, opts, lr)
    sched = make_scheduler(opt, opts, lr, steps)
    plateau = (
        torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=opts.gamma)
        if opts.scheduler == "plateau"
        else None
    )
    autocast, scaler = _amp_context(device, opts.amp)
    check_every = 1 if device.type == "cpu" else 25
    best_acc, best_state, since_best = -1.0, None, 0
    t_start = time.perf_counter()
    val_loader = _val_loader(state, ddp) if validate else None
    global_step = 0
    hook_stop = False
    for epoch in range(opts.epochs):
        model.train()
        epoch_sampler = sampler if sampler is not None else getattr(loader, "sampler", None)
        if hasattr(epoch_sampler, "set_epoch"):  # DistributedSampler: a new shuffle each epoch
            epoch_sampler.set_epoch(epoch)  # type: ignore[union-attr]
        state.ctx.listener.on_epoch_start(label, epoch + 1, opts.epochs, steps)
        run_loss = torch.zeros((), device=device)
        seen = 0
        for step, (x, y) in enumerate(loader):
            if step >= steps:
                break
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            with autocast():
                out = net(x)
                loss = (
                    loss_fn(out, x, y)
                    if loss_fn
                    else F.cross_entropy(out, y, label_smoothing=opts.label_smoothing)
                )
                if opts.l1 > 0:
                    loss = loss + opts.l1 * l1_penalty(model)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            for p in extra_sync:  # parameters outside the DDP module: average their gradients by hand
                if p.grad is not None:
                    p.grad.copy_(dist_.all_reduce_tensor_mean(p.grad))
            if opts.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, opts.grad_clip)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            if sched is not None:
                sched.step()
            if after_step is not None:
                after_step()
            run_loss += loss.detach()
            seen += 1
            global_step += 1
            if on_step is not None:
                step_loss = float(
                    dist_.all_reduce_tensor_mean(loss.detach().float()) if ddp else loss.detach()
                )
                hook_stop = bool(on_step(global_step - 1, step_loss, opt))
            state.ctx.listener.on_step(label)
            if hook_stop:
                break
            if (step + 1) % check_every == 0:
                check = dist_.all_reduce_tensor_mean(loss.detach().float()) if ddp else loss.detach()
                if not math.isfinite(float(check)):
                    raise StageError(
                        f"{label}: loss became {float(check)} at epoch {epoch + 1}, step {step + 1} "
                        f"(lr={opt.param_groups[0]['lr']:.3g}); lower the lr or set grad_clip"
                    )
            if state.ctx.should_stop():  # a signal or the time budget: finish this step, keep what was learnt
                result.stopped_early = True
                break
        loss_sum, n_seen = float(run_loss), float(seen)
        if ddp:
            loss_sum, n_seen = dist_.all_reduce_sum([loss_sum, n_seen])
        mean_loss = loss_sum / max(1.0, n_seen)
        if not math.isfinite(mean_loss) and not hook_stop:
            raise StageError(
                f"{label}: loss became {mean_loss} in epoch {epoch + 1}; lower the lr or set grad_clip"
            )
        metrics: dict[str, float] = {
            "epoch": epoch + 1,
            "train_loss": mean_loss,
            "lr": opt.param_groups[0]["lr"],
        }
        if val_loader is not None:
            ev = _evaluate(model, device, val_loader, state.data.num_classes, ddp)
            metrics["val_accuracy"] = ev["accuracy"]
            metrics["val_loss"] = ev["loss"]
        result.history.append(metrics)
        result.epochs_run = epoch + 1
        state.ctx.listener.on_epoch_end(label, metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        for callback in state.ctx.epoch_callbacks:
            callback(epoch, metrics)
        if hook_stop:
            break
        if plateau is not None and "val_accuracy" in metrics:
            plateau.step(metrics["val_accuracy"])
        acc = metrics.get("val_accuracy")
        if acc is not None:
            if acc > best_acc:
                best_acc, since_best = acc, 0
                if opts.early_stopping is not None:
                    best_state = copy.deepcopy(model.state_dict())
            else:
                since_best += 1
            if opts.early_stopping is not None and since_best >= opts.early_stopping:
                result.stopped_early = True
                break
        stop = state.ctx.should_stop()
        if dist_.any_rank(stop) if ddp else stop:  # the budget ran out during validation, or a signal
            result.stopped_early = True
            break
    if best_state is not None and opts.early_stopping is not None:
        model.load_state_dict(best_state)
    result.best_val_accuracy = best_acc if best_acc >= 0 else None
    result.seconds = time.perf_counter() - t_start
    model.eval()
    return result


def _val_loader(state: State, ddp: bool) -> Any:
    """The validation loader; under DDP each rank evaluates an interleaved shard (no padding)."""
    if not ddp:
        return state.data.loader("val")
    from torch.utils.data import DataLoader

    from compress_cli.runtime import distributed as dist_

    ds = state.data.val_dataset if state.data.val_dataset is not None else state.data.test_dataset
    return DataLoader(
        dist_.shard(ds),
        batch_size=state.data.eval_batch_size,
        shuffle=False,
        num_workers=state.data.num_workers,
    )


def _evaluate(
    model: nn.Module, device: torch.device, loader: Any, num_classes: int, ddp: bool
) -> dict[str, float]:
    """Validation accuracy and loss; under DDP the shard counts are summed over ranks (exact)."""
    from compress_cli.runtime import distributed as dist_
    from compress_cli.runtime.measure import evaluate

    if not ddp:
        return evaluate(_TrainRunner(model, device), loader, num_classes)
    n_local = len(loader.dataset)
    if n_local:
        ev = evaluate(_TrainRunner(model, device), loader, num_classes)
        local = [ev["accuracy"] * n_local, ev["loss"] * n_local, float(n_local)]
    else:
        local = [0.0, 0.0, 0.0]
    correct, loss_sum, n = dist_.all_reduce_sum(local)
    return {"accuracy": correct / max(1.0, n), "loss": loss_sum / max(1.0, n)}


class _TrainRunner:
    """Evaluates the model being trained (eval mode, no grad) without the pipeline's runner."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model, self.device = model, device

    def prepare(self) -> None:
        self.model.eval()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.inference_mode():
            return self.model(x.to(self.device))
