"""The ``finetune`` stage: train the current model with the shared training loop."""

from __future__ import annotations

from compress_cli.stages.base import Stage, StageConfig, StageResult
from compress_cli.stages.registry import register_stage
from compress_cli.state import State
from compress_cli.training import TrainOptions, train


class FinetuneConfig(StageConfig, TrainOptions):
    """Train the current model (from its checkpoint, or from random init when there is none)."""


@register_stage("finetune")
class Finetune(Stage[FinetuneConfig]):
    """Train the current model with the shared training loop (optimizers, schedules, L1/L2, AMP)."""

    example = {"epochs": 1, "lr": 0.01, "max_steps_per_epoch": 5}

    @classmethod
    def trains(cls, config: StageConfig) -> bool:
        return True

    def run(self, state: State) -> StageResult:
        res = train(state.model, state, self.config, label=self.name)
        return StageResult(notes=res.notes(), details=res.summary())
