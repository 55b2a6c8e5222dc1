"""``DataBundle``: what every data source builds, and what stages read the data through."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, Dataset

    from compress_cli.config.recipe import DataConfig


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

    @classmethod
    def from_config(
        cls,
        cfg: DataConfig,
        seed: int,
        train: Dataset,
        val: Dataset | None,
        test: Dataset,
        num_classes: int,
        input_shape: Sequence[int],
    ) -> DataBundle:
        """The bundle over the three splits, with the batch sizes and loader settings of ``cfg``."""
        return cls(
            train_dataset=train,
            val_dataset=val,
            test_dataset=test,
            num_classes=int(num_classes),
            input_shape=tuple(int(d) for d in input_shape),
            batch_size=cfg.batch_size,
            eval_batch_size=cfg.eval_batch_size,
            calibration_batches=cfg.calibration_batches,
            seed=seed,
            num_workers=cfg.num_workers,
        )

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

    def check_model(self, model: nn.Module, classes_hint: Callable[[int, int], str] | None = None) -> None:
        """One forward pass of ``model`` on a sample of this data's shape: raise SourceError unless it
        gives ``(batch, classes)`` logits with as many classes as the data has (when labelled).
        ``classes_hint(model_classes, data_classes)``: the way out of a class-count mismatch, naming
        the recipe keys of the sources at hand (``sources.hints.num_classes_hint``)."""
        import torch

        from compress_cli.errors import SourceError

        x = self.example_input(2)
        try:
            with torch.no_grad():
                model.eval()
                y = model(x)
        except Exception as e:
            raise SourceError(
                f"model does not accept the data's input shape {list(self.input_shape)} "
                f"({type(e).__name__}: {str(e).splitlines()[0]}); check model.input_shape / the data source"
            ) from None
        if not isinstance(y, torch.Tensor) or y.dim() != 2:
            raise SourceError(
                f"model output should be (batch, classes) logits, got {getattr(y, 'shape', type(y))}"
            )
        if self.labelled and y.shape[1] != self.num_classes:
            hint = classes_hint or (lambda m, n: f"set model.kwargs.num_classes: {n}")
            raise SourceError(
                f"model outputs {y.shape[1]} classes but the data has {self.num_classes}: "
                f"{hint(int(y.shape[1]), int(self.num_classes))}"
            )

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """A random batch of ``batch`` inputs of the data's sample shape (tracing, MACs, latency)."""
        import torch

        return torch.randn(batch, *self.input_shape)
