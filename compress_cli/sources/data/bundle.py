"""``DataBundle``: what every data source builds, and what stages read the data through."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.data import DataLoader, Dataset

    from compress_cli.config.recipe import DataConfig
    from compress_cli.tasks.base import Task


#: samples of the evaluation split kept as the example batch (larger batches repeat them)
EXAMPLE_BATCH = 64


@dataclass
class DataBundle:
    """Loaders over the train / validation / test splits plus a few calibration batches.

    ``train_dataset`` is kept so stages can ask for a loader with another batch size. ``task``
    (attached by the engine; classification by default) splits batches into model inputs and
    targets: batches may be tensors, tuples or dicts (see :mod:`compress_cli._utils.batches`).
    ``input_shape`` is one sample's shape for single-tensor inputs (``()`` when inputs are
    structured: ``example_input`` gives a real batch of the real structure). ``labelled`` is False
    for data without labels (``num_classes`` None); ``num_classes`` is also None for labels that
    are not class indices (regression targets).
    """

    train_dataset: Dataset
    val_dataset: Dataset | None
    test_dataset: Dataset
    num_classes: int | None
    input_shape: tuple[int, ...]
    batch_size: int
    eval_batch_size: int = 256
    calibration_batches: int = 8
    seed: int = 0
    num_workers: int = 0
    labelled: bool = True
    task: Task | None = field(default=None, repr=False)
    _calib: list[tuple[Any, Any]] | None = field(default=None, repr=False)
    _example: Any = field(default=None, repr=False)

    @classmethod
    def from_config(
        cls,
        cfg: DataConfig,
        seed: int,
        train: Dataset,
        val: Dataset | None,
        test: Dataset,
        num_classes: int | None,
        input_shape: Sequence[int],
        labelled: bool = True,
    ) -> DataBundle:
        """The bundle over the three splits, with the batch sizes and loader settings of ``cfg``
        (``num_classes`` None: unlabelled data, or labels that are not class indices)."""
        return cls(
            train_dataset=train,
            val_dataset=val,
            test_dataset=test,
            num_classes=None if num_classes is None else int(num_classes),
            labelled=labelled,
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

    def get_task(self) -> Task:
        """The task that splits this data's batches (classification when none was attached)."""
        if self.task is None:
            from compress_cli.config.recipe import TaskConfig
            from compress_cli.tasks import build_task

            self.task = build_task(TaskConfig(), self.num_classes if self.labelled else None)
        return self.task

    def calibration(self) -> list[tuple[Any, Any]]:
        """``(inputs, target)`` of the first ``calibration_batches`` training batches (fixed order,
        cached); target is None for unlabelled data."""
        if self._calib is None:
            task = self.get_task()
            out = []
            for i, batch in enumerate(self.loader("train", shuffle=False)):
                if i >= self.calibration_batches:
                    break
                out.append(task.split(batch))
            self._calib = out
        return self._calib

    def calibration_inputs(self) -> list[Any]:
        """The model inputs of the calibration batches."""
        return [inputs for inputs, _ in self.calibration()]

    def check_model(self, model: nn.Module, classes_hint: Callable[[int, int], str] | None = None) -> None:
        """One forward pass of ``model`` on a real sample batch: raise SourceError unless the task
        can score its output (e.g. ``(batch, classes)`` logits with as many classes as the data).
        ``classes_hint(model_classes, data_classes)``: the way out of a class-count mismatch, naming
        the recipe keys of the sources at hand (``sources.hints.num_classes_hint``)."""
        import torch

        from compress_cli._utils.batches import describe, sample_shape
        from compress_cli.errors import SourceError

        task = self.get_task()
        inputs, target = task.split(self.first_batch(2))
        try:
            with torch.no_grad():
                model.eval()
                out = task.forward(model, inputs)
        except SourceError:
            raise
        except Exception as e:
            what = (
                f"input shape {sample_shape(inputs)}"
                if isinstance(inputs, torch.Tensor)
                else f"inputs ({describe(inputs)})"
            )
            raise SourceError(
                f"model does not accept the data's {what} "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check model.input_shape, "
                "the data source, and task.inputs / task.output"
            ) from None
        from compress_cli.tasks.classification import Classification

        if isinstance(task, Classification):
            task.classes_hint = classes_hint
        task.check_output(out, target)

    def first_batch(self, batch: int) -> Any:
        """The first ``batch`` samples of the evaluation split (repeated if it holds fewer), as the
        loader yields them (real data of the real structure; cached)."""
        from compress_cli._utils.batches import take

        if self._example is None:
            loader = self.loader("test", batch_size=EXAMPLE_BATCH, shuffle=False)
            self._example = next(iter(loader))
        return take(self._example, batch)

    def example_input(self, batch: int = 1) -> Any:
        """Model inputs of ``batch`` real samples (tracing, MACs, latency, export, exactness checks):
        a tensor, or the tuple/dict the model's forward takes."""
        return self.get_task().inputs(self.first_batch(batch))
