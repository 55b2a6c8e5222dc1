"""Shared plumbing of the tasks whose metric math comes from torchmetrics.

Why torchmetrics: it is already a dependency, it is the PyTorch ecosystem's maintained metric
library (Lightning AI), and its metrics accumulate state over batches exactly as
:class:`~compress_cli.tasks.base.Evaluator` needs (``update`` per batch, ``compute`` once): R²
keeps running sums, average precision and Spearman keep the scores, Jaccard keeps a confusion
matrix (so mIoU is dataset-level, the PASCAL VOC / Cityscapes convention, not a mean of
per-image IoUs). Hand-written mAP and mIoU are where subtle bugs live (ties, empty classes,
ignored pixels). torchmetrics (and torch) are imported inside functions: ``compress tasks`` and
``compress validate`` stay torch-free.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: torchmetrics warnings about choices made here on purpose (exact AP keeps every score; a label
#: without positives is left out of the macro averages by the task itself)
QUIET = (
    r".*will save all targets and predictions in (the )?buffer.*",
    r"No positive samples found in target.*",
    r"No negative samples found in target.*",
)


@contextmanager
def quiet() -> Iterator[None]:
    """Silence the torchmetrics warnings listed in :data:`QUIET` (and only those)."""
    with warnings.catch_warnings():
        for message in QUIET:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        yield


def shape(t: Any) -> str:
    """``(4, 3)``-style text of a tensor's shape (or the type of a non-tensor), for messages."""
    s = getattr(t, "shape", None)
    if s is None:
        return type(t).__name__
    return "(" + ", ".join(str(int(d)) for d in s) + ")"


def value(metric: Any) -> float:
    """A torchmetrics metric's computed scalar as a float."""
    with quiet():
        return float(metric.compute())
