"""The ``evaluate`` stage: an explicit measuring point that changes nothing."""

from __future__ import annotations

from compress_cli.stages.base import Stage, StageConfig, StageResult
from compress_cli.stages.registry import register_stage
from compress_cli.state import State


class EvaluateConfig(StageConfig):
    """An explicit measuring point (the pipeline measures after every stage)."""


@register_stage("evaluate")
class Evaluate(Stage[EvaluateConfig]):
    """An explicit measuring point: changes nothing; the pipeline measures the model after it."""

    @classmethod
    def modifies(cls, config: StageConfig) -> bool:
        return False

    def run(self, state: State) -> StageResult:
        return StageResult(notes="measured")
