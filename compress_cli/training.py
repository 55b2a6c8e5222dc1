"""THE training loop. finetune, distill, QAT, pruning schedules and HPO trials all call ``train``.

Options every training stage shares live in ``TrainOptions`` (a pydantic mixin for stage configs):
optimizer, lr (or ``auto``), schedules with warm-up, weight decay and L1, label smoothing, gradient
clipping, early stopping on validation accuracy (restores the best weights), AMP on CUDA.

Mid-stage checkpoints: inside a pipeline stage, ``train`` writes everything it needs to continue
(model, optimizer, schedulers, AMP scaler, RNG states, counters, early-stopping state, the training
loader's shuffle state and the batches consumed) to ``STAGE_DIR/train/NN.pt`` at the end of every
epoch, every ``checkpoint_every_s`` seconds within one, and when a signal stops it; a stage resumed
with ``--resume`` re-runs its code, and each ``train`` call continues from its checkpoint (or, when
it had finished, returns what it returned then). On CPU with ``num_workers: 0`` the resumed run is
bit-equal to an uninterrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
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
    from pathlib import Path

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
    checkpoint_every_s: float = Field(
        600.0,
        ge=1,
        le=86400,
        description="seconds between mid-epoch checkpoints (one is also written after every epoch); "
        "--resume continues the stage from the last",
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
    extra = list(extra_params or [])
    # probes (their own loader, a step hook) and torchrun ranks do not checkpoint; nor do hpo trials
    slot = state.ctx.next_train_checkpoint() if loader is None and on_step is None and not ddp else None
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
    extra_sync = [p for p in extra if isinstance(p, torch.Tensor)] if ddp else []
    params = [p for p in model.parameters() if p.requires_grad] + extra
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
    interrupted = False  # a signal or the time budget stopped training: no "finished" checkpoint
    gen = getattr(loader, "generator", None)  # the training shuffle's state: saved, restored
    ckpt = None
    start_epoch, skip, saved = 0, 0, None
    if slot is not None:
        ckpt = _Checkpoint(
            slot[0], f"{slot[1]}/{_signature(model, opts, label, extra)}", opts.checkpoint_every_s
        )
        saved = ckpt.load()
    if saved is not None:
        model.load_state_dict(saved["model"])
        with torch.no_grad():
            for p, v in zip(extra, saved["extra"], strict=True):
                p.copy_(v)
        if saved["done"]:  # this call had finished: give back what it gave then, generators included
            _set_rng(saved["rng"])
            model.eval()
            state.ctx.listener.on_message(f"{label}: finished before the interruption; resumed from its end")
            return TrainResult(**saved["result"])
        opt.load_state_dict(saved["optimizer"])
        for obj, name in ((sched, "scheduler"), (plateau, "plateau"), (scaler, "scaler")):
            if obj is not None and saved[name] is not None:
                obj.load_state_dict(saved[name])
        if gen is not None and saved["loader_generator"] is not None:
            gen.set_state(saved["loader_generator"])
        start_epoch, skip, global_step = saved["epoch"], saved["consumed"], saved["global_step"]
        best_acc, since_best, best_state = saved["best_acc"], saved["since_best"], saved["best_state"]
        result.history, result.epochs_run = list(saved["history"]), saved["epochs_run"]
        t_start -= saved["seconds"]
        if not skip:
            _set_rng(saved["rng"])
        state.ctx.listener.on_message(
            f"{label}: resuming at epoch {start_epoch + 1}" + (f", step {skip + 1}" if skip else "")
        )

    def position(epoch: int, consumed: int, generator: Any, run_loss: Any, seen: int) -> dict[str, Any]:
        return {
            "done": False,
            "epoch": epoch,
            "consumed": consumed,
            "loader_generator": generator,
            "run_loss": run_loss.detach().cpu() if run_loss is not None else None,
            "seen": seen,
            "global_step": global_step,
            "model": model.state_dict(),
            "extra": [p.detach().cpu() for p in extra],
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict() if sched is not None else None,
            "plateau": plateau.state_dict() if plateau is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": _rng_state(),
            "best_acc": best_acc,
            "since_best": since_best,
            "best_state": best_state,
            "history": result.history,
            "epochs_run": result.epochs_run,
            "seconds": time.perf_counter() - t_start,
        }

    for epoch in range(start_epoch, opts.epochs):
        model.train()
        epoch_sampler = sampler if sampler is not None else getattr(loader, "sampler", None)
        if hasattr(epoch_sampler, "set_epoch"):  # DistributedSampler: a new shuffle each epoch
            epoch_sampler.set_epoch(epoch)  # type: ignore[union-attr]
        gen_state = gen.get_state() if gen is not None else None  # this epoch's order comes from it
        state.ctx.listener.on_epoch_start(label, epoch + 1, opts.epochs, steps)
        run_loss = torch.zeros((), device=device)
        seen = 0
        batches = iter(loader)
        first = 0
        if skip and saved is not None:  # resuming mid-epoch: the same order, the consumed batches skipped
            for _ in range(skip):
                next(batches, None)
            run_loss, seen = saved["run_loss"].to(device), saved["seen"]
            _set_rng(saved["rng"])  # after the skipped batches: a transform drawing numbers did not count
            first, skip = skip, 0
        for step, (x, y) in enumerate(batches, start=first):
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
            stop = state.ctx.should_stop()
            if ckpt is not None and (stop or ckpt.due()):
                ckpt.save(position(epoch, step + 1, gen_state, run_loss, seen))
            if stop:  # a signal or the time budget: finish this step, keep what was learnt
                result.stopped_early = interrupted = True
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
        if ckpt is not None and not interrupted:
            ckpt.save(position(epoch + 1, 0, gen.get_state() if gen is not None else None, None, 0))
        stop = state.ctx.should_stop()
        if dist_.any_rank(stop) if ddp else stop:  # the budget ran out during validation, or a signal
            result.stopped_early = interrupted = True
            break
    if best_state is not None and opts.early_stopping is not None:
        model.load_state_dict(best_state)
    result.best_val_accuracy = best_acc if best_acc >= 0 else None
    result.seconds = time.perf_counter() - t_start
    model.eval()
    if ckpt is not None and not interrupted:  # finished: a resumed stage skips this call
        ckpt.save(
            {
                "done": True,
                "model": model.state_dict(),
                "extra": [p.detach().cpu() for p in extra],
                "rng": _rng_state(),
                "result": dataclasses.asdict(result),
            }
        )
    return result


#: the clock mid-epoch checkpoints are timed by (tests replace it)
_clock = time.monotonic
_FORMAT = 1


class _Checkpoint:
    """One ``train`` call's mid-stage checkpoint file: written atomically (temp file, fsync, rename)
    with ``torch.save`` of plain tensors, numbers, strings, lists and dicts; read back with
    ``weights_only=True`` and only when its key (recipe, stage, call, options, model shapes) matches."""

    def __init__(self, path: Path, key: str, every_s: float):
        self.path, self.key, self.every_s = path, key, every_s
        self.last = _clock()

    def due(self) -> bool:
        """Whether ``every_s`` seconds passed since the last write (or the start)."""
        return _clock() - self.last >= self.every_s

    def load(self) -> dict[str, Any] | None:
        """The saved checkpoint when it belongs to this call, else None (and this call's file goes).
        Unless this call had finished, the files of the calls after it go too: they were written
        after it stopped (a signal stops every later call at its first step) or by another config."""
        import torch

        saved = None
        if self.path.is_file():
            try:
                saved = torch.load(self.path, map_location="cpu", weights_only=True)
            except Exception:  # not ours, or unreadable: start this call over
                saved = None
            if not (
                isinstance(saved, dict) and saved.get("key") == self.key and saved.get("format") == _FORMAT
            ):
                saved = None
        if saved is not None and saved["done"]:
            return saved
        n = int(self.path.stem)
        for f in self.path.parent.glob("*.pt"):
            if f.stem.isdigit() and int(f.stem) >= n + (saved is not None):
                f.unlink(missing_ok=True)
        return saved

    def save(self, payload: dict[str, Any]) -> None:
        """Write ``payload`` (with this call's key) over the previous checkpoint, atomically."""
        import torch

        from compress_cli._utils.io import atomic_write_with

        try:
            atomic_write_with(
                self.path, lambda f: torch.save({"format": _FORMAT, "key": self.key, **payload}, f)
            )
        except OSError as e:  # a write error has no file name: name the checkpoint (the run reports it)
            raise OSError(e.errno, e.strerror or str(e), str(self.path)) from e
        self.last = _clock()


def _signature(model: nn.Module, opts: TrainOptions, label: str, extra: list[Any]) -> str:
    """A digest of what a checkpoint must agree with: the options, the label, the tensors' shapes."""
    shapes = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    shapes += [list(p.shape) for p in extra]
    options = opts.model_dump(mode="json", exclude={"checkpoint_every_s"})  # timing only: may change
    text = json.dumps([options, label, shapes], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _rng_state() -> dict[str, Any]:
    """Every generator a training step may draw from (python, numpy, torch, CUDA), as plain values."""
    import random

    import numpy as np
    import torch

    version, keys, gauss = random.getstate()
    np_state: Any = np.random.get_state()  # the legacy tuple: (name, keys, pos, has_gauss, gauss)
    _, np_keys, np_pos, np_has_gauss, np_gauss = np_state
    return {
        "python": [version, list(keys), gauss],
        "numpy": [
            torch.from_numpy(np_keys.astype(np.int64)),
            int(np_pos),
            int(np_has_gauss),
            float(np_gauss),
        ],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def _set_rng(saved: dict[str, Any]) -> None:
    """Put back the generators :func:`_rng_state` saved."""
    import random

    import numpy as np
    import torch

    version, keys, gauss = saved["python"]
    random.setstate((version, tuple(keys), gauss))
    np_keys, np_pos, np_has_gauss, np_gauss = saved["numpy"]
    np.random.set_state(("MT19937", np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(saved["torch"])
    if saved["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])


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
