"""The rules that span stages or need the device, in one place.

- ``auto`` (``lr: auto``) needs an earlier stage that provides the value (lr_find, batch_size_find);
- nothing modifies or trains the model after a stage froze it for inference (real int8 conversion);
- each stage class's own static ``check`` (e.g. a scheme not available on the device).
Stage lists nested in a stage (hpo's ``stages``) are checked in place, as if they ran there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from compress_cli.config.recipe import AUTO

if TYPE_CHECKING:
    from compress_cli.config.recipe import Recipe
    from compress_cli.config.stage import StageConfig, StageSpec
    from compress_cli.config.yaml import RawRecipe

# the stage that finds each value an ``auto`` can stand for (messages only)
_FINDERS = {"lr": "lr_find", "batch_size": "batch_size_find"}


def cross_stage_rules(
    recipe: Recipe, stages: Mapping[str, StageSpec], raw: RawRecipe | None = None
) -> list[str]:
    """One located problem line per broken rule (``raw`` gives the lines); [] if the recipe is fine.

    ``stages`` maps each stage type in ``recipe`` to its class (the stage registry).
    """
    where = raw.where if raw else (lambda p: "<recipe>")
    findable = set().union(*(spec.provides for spec in stages.values()))  # what 'auto' can stand for
    walk = _RuleWalk(stages, findable, where, recipe.device)
    walk.check(recipe.stages, ("stages",), "")
    return walk.problems


class _RuleWalk:
    """The state the rules carry along the run order: values provided, the freezing stage, earlier configs."""

    def __init__(
        self,
        stages: Mapping[str, StageSpec],
        findable: set[str],
        where: Callable[[tuple[Any, ...]], str],
        device: str,
    ):
        self.stages = stages
        self.findable = findable
        self.where = where
        self.device = device
        self.provided: set[str] = set()
        self.frozen: str | None = None  # label of the stage that converted the model for inference
        self.earlier: list[StageConfig] = []
        self.problems: list[str] = []

    def check(self, configs: list[StageConfig], path: tuple[Any, ...], prefix: str) -> None:
        """The rules over one list of stages; nested lists (``children``) are checked in place."""
        where = self.where
        for i, cfg in enumerate(configs):
            spec = self.stages[cfg.type]
            label = f"{prefix}stages[{i}] ({cfg.type})"
            for key, value in cfg.model_dump().items():
                if value == AUTO and key in self.findable and key not in self.provided:
                    finder = _FINDERS.get(key, "a stage that finds it")
                    self.problems.append(
                        f"{where((*path, i, key))}: {label}.{key}: "
                        f"'auto' needs {finder} earlier in the recipe"
                    )
            if self.frozen is not None and spec.modifies(cfg):
                what = "train" if spec.trains(cfg) else "change the model"
                self.problems.append(
                    f"{where((*path, i))}: {label}: cannot {what} after {self.frozen} converted the model "
                    "for inference (move this stage before it; "
                    "for training with quantization use scheme: qat)"
                )
            for msg in spec.check(cfg, self.device, tuple(self.earlier)):
                self.problems.append(f"{where((*path, i))}: {label}: {msg}")
            for field_name, nested in spec.children(cfg):
                self.check(nested, (*path, i, field_name), f"{label}.")
            self.earlier.append(cfg)
            self.provided |= spec.provides
            if spec.freezes(cfg):
                self.frozen = label
