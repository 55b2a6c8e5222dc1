"""Dataset sources: ``build_data(cfg, seed, input_shape) -> DataBundle``.

Sources (``data.source``), one module each, registered by name in :mod:`.registry`:

- ``digits``: scikit-learn's embedded 8x8 digits (1797 images, 10 classes); the default
  (:mod:`.builtin`, with ``synthetic``: random inputs and labels for latency-only runs);
- ``mnist`` / ``fashion_mnist``: IDX files under ``data.root`` (:mod:`.idx`);
- ``torchvision:NAME``: any ``torchvision.datasets`` class (:mod:`.torchvision`);
- ``imagefolder``: ``root/train`` plus ``root/val`` and/or ``root/test`` class folders
  (:mod:`.imagefolder`);
- ``text``: CSV/TSV/JSONL/JSON/TXT files of text, tokenised with the model's tokenizer, and
  ``hf_datasets``: Hugging Face ``datasets`` from local files or a saved folder (:mod:`.text`);
- ``package.module:callable``: your own factory returning the splits (:mod:`.plugin`).

Every source is split the same way (:mod:`.splits`: seeded, stratified, one random stream per
decision). Every failure a user can cause raises :class:`~compress_cli.errors.SourceError` naming
the path or source and the rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from compress_cli.errors import SourceError

# imported for their effect: each module registers its builders
from compress_cli.sources.data import builtin, idx, imagefolder, plugin, text, torchvision  # noqa: F401
from compress_cli.sources.data.bundle import DataBundle
from compress_cli.sources.data.idx import DEFAULT_ROOTS, FASHION_STATS, MNIST_STATS, find_idx_file, read_idx
from compress_cli.sources.data.registry import parse, register_source
from compress_cli.sources.data.splits import dataset_labels, limit_indices, split_train_val, stratified_take
from compress_cli.sources.data.torchvision import IMAGENET_STATS

if TYPE_CHECKING:
    from compress_cli.config.recipe import DataConfig


def check_source(source: str) -> str | None:
    """A problem with the ``data.source`` name, or None; cheap (imports nothing heavy)."""
    parsed = parse(source)
    return parsed if isinstance(parsed, str) else None


def build_data(
    cfg: DataConfig, seed: int, input_shape: Sequence[int] | None = None, model_source: str | None = None
) -> DataBundle:
    """Load ``cfg.source`` and split it into a :class:`DataBundle`.

    ``input_shape`` (one sample's shape, usually ``model.input_shape``) sizes synthetic data and
    resizes imagefolder images when the data config does not say. ``model_source`` (the recipe's
    ``model.source``) is where text sources find the tokenizer when ``data.kwargs.tokenizer`` is
    unset: the model's ``hf:`` directory.
    """
    parsed = parse(cfg.source)
    if isinstance(parsed, str):
        raise SourceError(f"data.source: {parsed}")
    source, argument = parsed
    if source.tokenizer and not cfg.kwargs.get("tokenizer"):
        from compress_cli.sources.hf import tokenizer_dir

        found = tokenizer_dir(model_source)
        if found is not None:
            cfg = cfg.model_copy(update={"kwargs": {**cfg.kwargs, "tokenizer": found}})
    shape = list(cfg.input_shape or input_shape or []) or None
    if not source.kwargs and cfg.kwargs:
        raise SourceError(f"{cfg.source}: takes no data.kwargs (got {sorted(cfg.kwargs)})")
    return source.build(cfg, seed, argument, shape)


__all__ = [
    "DEFAULT_ROOTS",
    "FASHION_STATS",
    "IMAGENET_STATS",
    "MNIST_STATS",
    "DataBundle",
    "build_data",
    "check_source",
    "dataset_labels",
    "find_idx_file",
    "limit_indices",
    "read_idx",
    "register_source",
    "split_train_val",
    "stratified_take",
]
