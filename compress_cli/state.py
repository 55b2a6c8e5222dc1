"""State passed from stage to stage: the model, the frozen original, data, device, found hparams."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress_cli._utils.modules import select_modules

if TYPE_CHECKING:
    import torch
    from torch import nn

    from compress_cli.config.recipe import ModelConfig, Recipe
    from compress_cli.sources.data.bundle import DataBundle


@dataclass
class Edit:
    stage: str
    op: str
    details: dict[str, Any]


@dataclass
class EditLog:
    items: list[Edit] = field(default_factory=list)

    def record(self, stage: str, op: str | None = None, **details: Any) -> None:
        self.items.append(Edit(stage, op or stage, details))

    def to_json(self) -> list[dict[str, Any]]:
        return [{"stage": e.stage, "op": e.op, **e.details} for e in self.items]


@dataclass
class State:
    model: nn.Module
    #: the model as loaded, frozen: the default teacher and the baseline; a big one waits in a file
    #: (see pipeline.build_state). Read it with ``original_model()``.
    original: nn.Module | Path
    data: DataBundle
    device: torch.device
    recipe: Recipe
    model_spec: ModelConfig  # how to rebuild the current architecture's base (changes on student swap)
    output_dir: Path
    hparams: dict[str, Any] = field(default_factory=dict)
    edits: EditLog = field(default_factory=EditLog)
    #: load-time transforms a stage needs replayed by load() (e.g. quantization); see checkpoint.py
    transforms: list[dict[str, Any]] = field(default_factory=list)
    runner: Any = None  # runners.Runner that measures the model; None = torch eager
    seed: int = 0
    emit: Callable[..., None] = field(default=lambda *a, **k: None, repr=False)
    stage_dir: Path | None = None  # the running stage's snapshot folder (for epoch checkpoints)
    should_stop: Callable[[], bool] = field(default=lambda: False, repr=False)
    #: called by training.train after every epoch with (epoch, metrics), after its own on_epoch
    #: (hpo reports validation accuracy to its pruner this way, through any wrapped stage)
    epoch_callbacks: list[Callable[[int, dict[str, float]], None]] = field(default_factory=list, repr=False)

    def original_model(self) -> nn.Module:
        """The model as loaded (eval mode, no gradients); read back from its file for each call when
        it waits on disk, so a caller holds it only as long as it needs it."""
        if not isinstance(self.original, Path):
            return self.original
        import torch

        model = torch.load(self.original, map_location=self.device, weights_only=False).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def select_modules(
        self, include: Iterable[str] = ("*",), exclude: Iterable[str] = (), kinds: tuple[type, ...] = ()
    ) -> list[tuple[str, nn.Module]]:
        return select_modules(self.model, include, exclude, kinds)

    def resolve(self, value: Any, key: str, default: Any = None) -> Any:
        """Turn ``auto`` into the value an earlier stage found (lr_find, batch_size_find)."""
        if value == "auto":
            if key in self.hparams:
                return self.hparams[key]
            if default is not None:
                return default
            from compress_cli.errors import StageError

            raise StageError(f"{key}: 'auto' but no earlier stage found a value")
        return value
