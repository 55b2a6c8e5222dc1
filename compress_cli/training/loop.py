"""THE training loop: ``train`` runs the epochs of every training stage (finetune, distill, QAT,
pruning schedules, codebook tuning, hpo trials), with mid-stage checkpoints (:mod:`.checkpoints`)."""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from compress_cli.errors import StageError
from compress_cli.training.checkpoints import TrainCheckpoint, rng_state, set_rng, signature
from compress_cli.training.options import (
    LossFn,
    StepHook,
    TrainOptions,
    TrainResult,
    l1_penalty,
    make_optimizer,
    make_scheduler,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from compress_cli.state import State
    from compress_cli.tasks.base import Task


def _amp_context(device: torch.device, enabled: bool) -> tuple[Any, Any, str]:
    """(autocast context factory, GradScaler or None, what it does for the notes). On CUDA: bf16
    autocast where the device supports bf16, else fp16 autocast with a GradScaler; elsewhere none."""
    import contextlib

    import torch

    if not enabled or device.type != "cuda":
        return contextlib.nullcontext, None, ""
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    how = "amp bf16" if scaler is None else "amp fp16 with GradScaler"
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler, how


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
    split: Callable[[Any], tuple[Any, Any]] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``state.data``'s training split.

    Each batch goes through the data's task (``state.data.get_task()``): ``task.split`` gives the
    model inputs and the target (None for unlabelled data), ``task.forward`` the selected output,
    and the loss is ``task.loss(output, target, reference)``, the reference being the original
    model's output on the same inputs when the task compares with it (fidelity). Classification
    keeps cross-entropy with ``label_smoothing``. Validation metrics per epoch are the task's
    (``val_accuracy``/``val_loss`` for classification; ``val_<metric>`` and ``val_score``, the
    primary metric, for other tasks); early stopping and the plateau schedule follow the primary
    metric in its direction.

    ``loss_fn(output, inputs, target)`` replaces the task's loss (distillation); ``split(batch)``
    replaces ``task.split`` (a loader whose batches carry sample indices); ``on_epoch(epoch, metrics)``
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

    from compress_cli._utils.batches import to_device
    from compress_cli.runtime import distributed as dist_
    from compress_cli.tasks.classification import Classification

    device = state.device
    task = state.data.get_task()
    classify = isinstance(task, Classification)
    if opts.label_smoothing > 0 and not classify and loss_fn is None:
        raise StageError(
            f"{label}: label_smoothing applies to the classification task's cross-entropy; the task is "
            f"{task.name}: remove label_smoothing"
        )
    higher = True if classify else bool(task.higher_is_better)
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
        torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max" if higher else "min", factor=opts.gamma)
        if opts.scheduler == "plateau"
        else None
    )
    autocast, scaler, result.amp = _amp_context(device, opts.amp)
    if opts.amp and device.type != "cuda" and "amp" in opts.model_fields_set:
        result.amp = f"amp ignored on {device.type} (mixed precision runs on CUDA only; trained in fp32)"
        if on_step is None:  # probes (lr_find, batch_size_find) stay quiet
            state.ctx.listener.on_message(f"{label}: {result.amp}")
    check_every = 1 if device.type == "cpu" else 25
    best: float | None = None  # the best validation score (primary metric) so far
    best_state, since_best = None, 0
    t_start = time.perf_counter()
    val_loader = _val_loader(state, ddp) if validate else None
    global_step = 0
    hook_stop = False
    interrupted = False  # a signal or the time budget stopped training: no "finished" checkpoint
    gen = getattr(loader, "generator", None)  # the training shuffle's state: saved, restored
    ckpt = None
    start_epoch, skip, saved = 0, 0, None
    if slot is not None:
        ckpt = TrainCheckpoint(
            slot[0], f"{slot[1]}/{signature(model, opts, label, extra)}", opts.checkpoint_every_s
        )
        saved = ckpt.load()
    if saved is not None:
        model.load_state_dict(saved["model"])
        with torch.no_grad():
            for p, v in zip(extra, saved["extra"], strict=True):
                p.copy_(v)
        if saved["done"]:  # this call had finished: give back what it gave then, generators included
            set_rng(saved["rng"])
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
        best, since_best, best_state = saved["best_acc"], saved["since_best"], saved["best_state"]
        if best == -1.0 and classify:  # written before scores were task-generic: "none yet"
            best = None
        result.history, result.epochs_run = list(saved["history"]), saved["epochs_run"]
        t_start -= saved["seconds"]
        if not skip:
            set_rng(saved["rng"])
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
            "rng": rng_state(),
            "best_acc": best,
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
            set_rng(saved["rng"])  # after the skipped batches: a transform drawing numbers did not count
            first, skip = skip, 0
        for step, batch in enumerate(batches, start=first):
            if step >= steps:
                break
            x, y = split(batch) if split is not None else task.split(batch)
            x = to_device(x, device, non_blocking=True)
            if y is not None:
                y = to_device(y, device, non_blocking=True)
            ref = None
            if loss_fn is None and not classify and task.needs_reference:
                ref = task.reference_output(x)  # the original's output, no grad (shuffled: not cached)
            with autocast():
                out = task.forward(net, x)
                if loss_fn is not None:
                    loss = loss_fn(out, x, y)
                elif classify:
                    loss = F.cross_entropy(out, y, label_smoothing=opts.label_smoothing)
                else:
                    loss = task.loss(out, y, ref)
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
            metrics.update(val_metrics(_evaluate(model, device, val_loader, task, ddp), task, classify))
        result.history.append(metrics)
        result.epochs_run = epoch + 1
        state.ctx.listener.on_epoch_end(label, metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        for callback in state.ctx.epoch_callbacks:
            callback(epoch, metrics)
        if hook_stop:
            break
        score = metrics.get("val_accuracy" if classify else "val_score")
        if plateau is not None and score is not None:
            plateau.step(score)
        if score is not None:
            if best is None or (score > best if higher else score < best):
                best, since_best = score, 0
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
    result.best_val_score = best
    result.val_metric = None if classify else str(task.primary)
    result.best_val_accuracy = best if classify else None
    result.seconds = time.perf_counter() - t_start
    model.eval()
    if ckpt is not None and not interrupted:  # finished: a resumed stage skips this call
        ckpt.save(
            {
                "done": True,
                "model": model.state_dict(),
                "extra": [p.detach().cpu() for p in extra],
                "rng": rng_state(),
                "result": dataclasses.asdict(result),
            }
        )
    return result


def val_metrics(ev: dict[str, float], task: Task, classify: bool) -> dict[str, float]:
    """An epoch's validation entries of the task's metrics ``ev``: ``val_accuracy`` and ``val_loss``
    for classification (as reports have always had them); ``val_<metric>`` for every metric and
    ``val_score`` (the primary metric) for any other task."""
    if classify:
        return {"val_accuracy": ev["accuracy"], "val_loss": ev["loss"]}
    out = {f"val_{k}": float(v) for k, v in ev.items() if k != "samples"}
    out["val_score"] = float(ev[task.primary])
    return out


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


def _evaluate(model: nn.Module, device: torch.device, loader: Any, task: Task, ddp: bool) -> dict[str, float]:
    """The task's validation metrics; under DDP each is averaged over ranks weighted by their
    samples (exact for per-sample means such as accuracy, loss and cosine)."""
    from compress_cli.runtime import distributed as dist_
    from compress_cli.runtime.measure import evaluate

    if not ddp:
        return evaluate(_TrainRunner(model, device), loader, task)
    n_local = len(loader.dataset)
    keys = list(task.metrics) or [task.primary]
    ev = evaluate(_TrainRunner(model, device), loader, task) if n_local else {}
    local = [float(ev.get(k, 0.0)) * n_local for k in keys] + [float(n_local)]
    *sums, n = dist_.all_reduce_sum(local)
    return {k: v / max(1.0, n) for k, v in zip(keys, sums, strict=False) if k in ev or not n_local}


class _TrainRunner:
    """Evaluates the model being trained (eval mode, no grad) without the pipeline's runner."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model, self.device = model, device

    def prepare(self) -> None:
        self.model.eval()

    def __call__(self, x: Any) -> Any:
        import torch

        from compress_cli._utils.batches import call, to_device

        with torch.inference_mode():
            return call(self.model, to_device(x, self.device))
