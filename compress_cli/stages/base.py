"""Base classes for stage plugins: a frozen pydantic config plus the code that applies it.

A stage module must stay cheap to import (no torch at module level): ``compress validate`` and
``compress stages`` import every stage to read its config. Import torch inside ``run``.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from compress_cli.config.stage import StageConfig

if TYPE_CHECKING:
    from torch import nn

    from compress_cli.state import State

__all__ = ["Stage", "StageConfig", "StageResult"]

C = TypeVar("C", bound=StageConfig)


@dataclass
class StageResult:
    """What a stage tells the pipeline besides the model it leaves in the state."""

    notes: str = ""
    details: dict[str, Any] = field(default_factory=dict)  # goes into report.json under the stage
    artifacts: list[str] = field(default_factory=list)  # files written into the output dir
    #: limits of the stage's own config its result does not meet (e.g. quantize's
    #: max_accuracy_drop): the pipeline handles them as guard violations after the stage, the
    #: stage's on_violation else the guard's (the result is saved either way)
    violations: list[str] = field(default_factory=list)


class Stage(Generic[C]):
    """Subclass as ``class Prune(Stage[PruneConfig])`` and decorate with ``@register_stage``."""

    type_name: ClassVar[str] = ""
    config_class: ClassVar[type[StageConfig]] = StageConfig
    #: a config (without ``type``) that runs on the digits test model in about a second
    example: ClassVar[dict[str, Any]] = {}
    #: hyperparameters this stage writes into ``state.hparams`` (enables ``auto`` in later stages)
    provides: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        for base in getattr(cls, "__orig_bases__", ()):
            args = typing.get_args(base)
            if args and isinstance(args[0], type) and issubclass(args[0], StageConfig):
                cls.config_class = args[0]

    def __init__(self, config: C, index: int = 0):
        self.config = config
        self.index = index

    @property
    def name(self) -> str:
        """The stage's label in the report and its messages: the config's ``name``, else its type."""
        return self.config.name or self.type_name

    # --- properties the cross-stage rules read -------------------------------------------
    @classmethod
    def trains(cls, config: StageConfig) -> bool:
        """True if this stage updates weights by gradient descent."""
        return False

    @classmethod
    def modifies(cls, config: StageConfig) -> bool:
        """False for stages that only read the model (evaluate, export)."""
        return True

    @classmethod
    def freezes(cls, config: StageConfig) -> bool:
        """True if after this stage the model can no longer be trained (real int8 conversion)."""
        return False

    @classmethod
    def replaces_model(cls, config: StageConfig) -> bool:
        """True if this stage swaps in another model (distill's new student): the later stages'
        preflight checks would test the wrong model, so they are skipped."""
        return False

    @classmethod
    def children(cls, config: StageConfig) -> list[tuple[str, list[StageConfig]]]:
        """Stage lists nested in this stage's config, as (field name, configs) (hpo's ``stages``).

        The cross-stage rules check them in place, as if they ran at this stage's position.
        """
        return []

    @classmethod
    def check(cls, config: StageConfig, device: str, earlier: Sequence[StageConfig] = ()) -> list[str]:
        """Extra static checks, one message each: e.g. a scheme not available on this device, or
        an export format the model left by the ``earlier`` stages (in run order) cannot take."""
        return []

    def preflight(self, state: State) -> None:
        """Checks against the loaded model, run for every stage before the first one starts (and by
        ``compress validate --model``): raise :class:`~compress_cli.errors.StageError` when this
        stage cannot apply to this model at all, so a run refuses up front instead of failing after
        hours of earlier stages. Must not modify the state."""

    def new_modules(self, state: State) -> list[tuple[str, nn.Module]]:
        """The modules this stage may put into the model, as (path, module): replacements it builds
        (e.g. a residual block's bypass). Before anything runs, the engine checks that the
        checkpoint manifest can describe each one, so a run that could not save its result is
        refused before the baseline. Must not modify the state."""
        return []

    def preview(self, state: State) -> list[str]:
        """Dry run (``compress validate --model``): what this stage would touch. Must not modify."""
        return []

    def run(self, state: State) -> StageResult:  # pragma: no cover - abstract
        """Apply the stage to ``state``: change or replace ``state.model``, record what changed in
        ``state.edits`` (found hyperparameters in ``state.hparams``) and return a :class:`StageResult`:
        notes, report details and the files written into ``state.ctx.output_dir``.

        A stage never prints (progress goes through ``state.ctx.listener``) and never measures: the
        pipeline measures the model after every stage, the same way for all, and checks the guards.
        When it cannot go on it raises :class:`~compress_cli.errors.StageError` saying what to change.
        """
        raise NotImplementedError
