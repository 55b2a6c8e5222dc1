"""The ``lr_find`` stage: an lr range test that sets ``hparams.lr`` for later ``lr: auto`` stages."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from compress_cli.config.bounds import MAX_PENALTY, MAX_SWEEP_LR, BatchSize, LearningRate
from compress_cli.stages.base import Stage, StageConfig, StageResult
from compress_cli.stages.registry import register_stage
from compress_cli.state import State


class LrFindConfig(StageConfig):
    """Learning-rate range test; the suggestion becomes ``lr: auto`` for later stages."""

    min_lr: float = Field(1e-6, gt=0, le=MAX_SWEEP_LR, description="lr of the first sweep step")
    max_lr: float = Field(1.0, gt=0, le=MAX_SWEEP_LR, description="lr of the last sweep step")
    steps: int = Field(100, ge=5, le=100_000, description="optimizer steps in the sweep")
    mode: Literal["exponential", "linear"] = Field(
        "exponential", description="how the lr grows from min_lr to max_lr"
    )
    smoothing: float = Field(
        0.9, ge=0, lt=1, description="beta of the bias-corrected moving average of the loss"
    )
    diverge: float = Field(
        4.0, gt=1, le=1e6, description="stop once the smoothed loss exceeds this multiple of its minimum"
    )
    suggestion: Literal["steepest", "min_div"] = Field(
        "steepest",
        description="steepest descent of the smoothed loss, or the minimum's lr divided by min_div_factor",
    )
    min_div_factor: float = Field(
        10.0, gt=1, le=1e6, description="min_div: divide the lr of the minimum by this"
    )
    skip_start: int = Field(10, ge=0, le=100_000, description="points ignored at the start of the curve")
    skip_end: int = Field(1, ge=0, le=100_000, description="points ignored at the end of the curve")
    min_improvement: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="a curve whose smoothed loss never falls by this fraction is flat (no suggestion)",
    )
    fallback_lr: LearningRate = Field(
        0.01,
        description="lr kept when no suggestion is reliable (unless an earlier stage already found one)",
    )
    optimizer: Literal["sgd", "adam", "adamw"] = Field(
        "adam", description="optimizer (use the one that will train)"
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(0.0, ge=0, le=MAX_PENALTY, description="L2 penalty (decoupled for adamw)")
    batch_size: BatchSize | Literal["auto"] | None = Field(
        None, description="sweep batch (default: data.batch_size; 'auto' from batch_size_find)"
    )
    amp: bool = Field(True, description="mixed precision on CUDA (ignored on CPU)")

    @model_validator(mode="after")
    def _range(self) -> LrFindConfig:
        if self.max_lr <= self.min_lr:
            raise ValueError(
                f"max_lr must be greater than min_lr (got min_lr={self.min_lr}, max_lr={self.max_lr})"
            )
        return self


@register_stage("lr_find")
class LrFind(Stage[LrFindConfig]):
    """Learning-rate range test: sweep the lr, suggest one from the loss curve (restores the model).

    The model, its buffers and the random generators are put back afterwards; only
    ``hparams["lr"]`` changes (the suggestion, or the fallback when the curve does not support
    one: that case is said in the notes and ``details.reliable`` is false). The curve is saved as
    ``lr_find-NN.png`` in the output directory and, downsampled, in the report's details.
    """

    example = {"steps": 20, "min_lr": 1e-4, "max_lr": 1.0, "skip_start": 2}
    provides = frozenset({"lr"})

    @classmethod
    def trains(cls, config: StageConfig) -> bool:
        return True  # it runs training steps (then restores the weights)

    def preview(self, state: State) -> list[str]:
        c = self.config
        return [
            f"sweep lr {c.min_lr:g} -> {c.max_lr:g} ({c.mode}) over {c.steps} steps with {c.optimizer}; "
            "sets hparams.lr"
        ]

    def run(self, state: State) -> StageResult:
        import math

        from compress_cli.runtime import distributed
        from compress_cli.training import TrainOptions
        from compress_cli.tuning import (
            downsample,
            lr_schedule,
            plot_lr_curve,
            preserved,
            run_lr_sweep,
            suggest_lr,
        )

        c = self.config
        schedule = lr_schedule(c.min_lr, c.max_lr, c.steps, c.mode)
        bs = state.resolve(c.batch_size, "batch_size") if c.batch_size is not None else None
        per_epoch = len(state.data.loader("train", batch_size=bs))
        opts = TrainOptions.model_validate(
            {
                "epochs": math.ceil(c.steps / max(1, per_epoch)),
                "lr": c.min_lr,
                "optimizer": c.optimizer,
                "momentum": c.momentum,
                "weight_decay": c.weight_decay,
                "batch_size": bs,
                "amp": c.amp,
            }
        )
        payload = None
        if distributed.is_main():  # under torchrun rank 0 sweeps alone; the others wait for its result
            with preserved(state.model):
                sweep = run_lr_sweep(
                    state.model, state, opts, schedule, beta=c.smoothing, diverge=c.diverge, label=self.name
                )
            sug = suggest_lr(
                sweep.lrs,
                sweep.losses,
                sweep.smoothed,
                method=c.suggestion,
                factor=c.min_div_factor,
                skip_start=c.skip_start,
                skip_end=c.skip_end,
                min_improvement=c.min_improvement,
            )
            payload = (sweep, sug)
        sweep, sug = distributed.broadcast(payload)
        previous = state.hparams.get("lr")
        if sug.lr is not None:
            lr, source = float(sug.lr), "suggestion"
            notes = f"lr {lr:.3g} ({sug.reason}); sweep {sweep.stop_reason} after {len(sweep.lrs)} steps"
        else:
            lr, source = (
                (float(previous), "earlier stage") if previous is not None else (c.fallback_lr, "fallback_lr")
            )
            notes = f"no reliable suggestion ({sug.reason}); keeping lr {lr:.3g} from {source}"
        state.hparams["lr"] = lr
        artifacts = []
        if distributed.is_main():
            path = state.ctx.output_dir / f"lr_find-{self.index:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            plot_lr_curve(path, sweep, sug, log_x=c.mode == "exponential")
            artifacts.append(path.name)
        state.ctx.listener.on_message(f"{self.name}: {notes}")
        details = {
            "lr": lr,
            "lr_source": source,
            "reliable": sug.lr is not None,
            "reason": sug.reason,
            "suggested_lr": sug.lr,
            "method": c.suggestion,
            "steps_run": len(sweep.lrs),
            "stop": sweep.stop_reason,
            **sug.info,
            "curve": {
                "lr": downsample(sweep.lrs),
                "loss": [v if math.isfinite(v) else None for v in downsample(sweep.smoothed)],
            },
        }
        return StageResult(notes=notes, details=details, artifacts=artifacts)
