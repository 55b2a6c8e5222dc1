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
    from torch.utils.data import DataLoader, Dataset

    from compress_cli.config.recipe import ModelConfig, Recipe


@dataclass
class DataBundle:
    """Loaders over the train / validation / test splits plus a few calibration batches.

    ``train_dataset`` is kept so stages can ask for a loader with another batch size.
    """

    train_dataset: Dataset
    val_dataset: Dataset | None
    test_dataset: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    batch_size: int
    eval_batch_size: int = 256
    calibration_batches: int = 8
    seed: int = 0
    num_workers: int = 0
    labelled: bool = True
    _calib: list[tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False)

    def loader(
        self, split: str, batch_size: int | None = None, shuffle: bool | None = None, sampler: Any = None
    ) -> DataLoader:
        """A loader over ``split``; ``sampler`` (e.g. a DistributedSampler) replaces shuffling."""
        import torch
        from torch.utils.data import DataLoader

        ds = {"train": self.train_dataset, "val": self.val_dataset, "test": self.test_dataset}[split]
        if ds is None:
            ds = self.test_dataset
        train = split == "train"
        bs = batch_size or (self.batch_size if train else self.eval_batch_size)
        if sampler is not None:
            return DataLoader(
                ds, batch_size=bs, sampler=sampler, num_workers=self.num_workers, drop_last=False
            )
        g = torch.Generator()
        g.manual_seed(self.seed)
        return DataLoader(
            ds,
            batch_size=bs,
            shuffle=train if shuffle is None else shuffle,
            generator=g,
            num_workers=self.num_workers,
            drop_last=False,
        )

    def calibration(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``calibration_batches`` training batches (fixed order, cached)."""
        if self._calib is None:
            out = []
            for i, batch in enumerate(self.loader("train", shuffle=False)):
                if i >= self.calibration_batches:
                    break
                out.append((batch[0], batch[1]))
            self._calib = out
        return self._calib

    def example_input(self, batch: int = 1) -> torch.Tensor:
        import torch

        return torch.randn(batch, *self.input_shape)


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
