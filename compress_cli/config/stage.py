"""The config every stage accepts, and what recipe validation reads from a stage class.

``StageConfig`` lives here, below the plugin layer, because a ``Recipe`` holds a list of them;
``compress_cli.stages.base`` builds ``Stage`` on it. ``StageSpec`` is the torch-free view of a stage
class that the cross-stage rules and the JSON Schema need, so config never imports a stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field


class StageConfig(BaseModel):
    """Fields every stage accepts. Unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str = Field(description="registered stage type")
    name: str | None = Field(None, description="label shown in the report (default: the type)")
    on_violation: Literal["fail", "revert", "warn"] | None = Field(
        None, description="what a guard violation after this stage does (default: the guard's)"
    )


class StageSpec(Protocol):
    """What validation reads from a registered stage class (``compress_cli.stages.base.Stage``)."""

    #: the pydantic model a recipe entry of this stage type is validated with
    config_class: type[StageConfig]
    #: hyperparameters the stage writes into ``state.hparams`` (enables ``auto`` in later stages)
    provides: frozenset[str]

    def trains(self, config: StageConfig) -> bool:
        """True if the stage updates weights by gradient descent with this config."""
        ...

    def modifies(self, config: StageConfig) -> bool:
        """False for a stage that only reads the model (evaluate, export)."""
        ...

    def freezes(self, config: StageConfig) -> bool:
        """True if after the stage the model can no longer be trained (real int8 conversion)."""
        ...

    def children(self, config: StageConfig) -> list[tuple[str, list[StageConfig]]]:
        """Stage lists nested in the config, as (field name, configs) (hpo's ``stages``)."""
        ...

    def check(self, config: StageConfig, device: str, earlier: Sequence[StageConfig] = ()) -> list[str]:
        """Static problems of the config on ``device`` after the ``earlier`` stages, one message each."""
        ...
