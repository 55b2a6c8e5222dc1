"""The sources that need no files: ``digits`` (scikit-learn's embedded 8x8 digits, 1797 images,
10 classes; the default) and ``synthetic`` (random inputs and labels of a given shape, for
latency-only runs)."""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from compress_cli.errors import SourceError
from compress_cli.sources.data.registry import register_source
from compress_cli.sources.data.splits import (
    SYNTH,
    TEST,
    split_train_val,
    stratified_take,
    stream_rng,
    tensor_bundle,
)

if TYPE_CHECKING:
    import torch

    from compress_cli.config.recipe import DataConfig
    from compress_cli.sources.data.bundle import DataBundle


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (1797, 8, 8) in 0..16, labels int64), read straight from sklearn's data file."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    if path is not None and path.is_file():
        raw = np.loadtxt(path, delimiter=",", dtype=np.float64)
        x, y = raw[:, :-1], raw[:, -1]
    else:  # pragma: no cover - layout changed; the public loader is slower but equivalent
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise SourceError(f"digits: scikit-learn is needed for the embedded digits set ({e})") from None
        d = load_digits()
        x, y = d.data, d.target
    x = x.reshape(-1, 8, 8).astype(np.uint8)
    x.setflags(write=False)
    y = y.astype(np.int64)
    y.setflags(write=False)
    return x, y


@register_source("digits", kwargs=False)
def build_digits(cfg: DataConfig, seed: int, _argument: str, _shape: list[int] | None) -> DataBundle:
    """scikit-learn's embedded 8x8 digits: a stratified ``test_fraction`` held out, normalised with
    the training split's mean and std."""
    import torch

    x, y = _digits_arrays()
    n_test = math.ceil(cfg.test_fraction * len(y))
    te, pool = stratified_take(y, n_test, stream_rng(seed, TEST))
    tr, _ = split_train_val(y[pool], cfg.val_fraction, cfg.limit_train, seed)
    train_x = x[pool][tr].astype(np.float32) / 16.0
    mean, std = float(train_x.mean()), float(train_x.std()) or 1.0

    def prepare(rows: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(rows.astype(np.float32)).div_(16.0).sub_(mean).div_(std)
        return t.unsqueeze(1)

    return tensor_bundle(cfg, seed, "digits", x[pool], y[pool], x[te], y[te], prepare)


@register_source("synthetic")
def build_synthetic(cfg: DataConfig, seed: int, _argument: str, shape: list[int] | None) -> DataBundle:
    """Seeded random inputs of ``shape`` and random labels (``data.kwargs``: train_size, test_size),
    for runs that only measure latency and size."""
    import torch

    if not shape:
        raise SourceError("synthetic: needs a sample shape: set data.input_shape or model.input_shape")
    if any(int(d) <= 0 for d in shape):
        raise SourceError(f"synthetic: input_shape must be positive sizes (got {shape})")
    kw = dict(cfg.kwargs)
    try:
        train_size = int(kw.pop("train_size", 512))
        test_size = int(kw.pop("test_size", 256))
    except (TypeError, ValueError) as e:
        raise SourceError(f"synthetic: data.kwargs train_size/test_size must be integers ({e})") from None
    if kw:
        raise SourceError(f"synthetic: unknown data.kwargs {sorted(kw)} (allowed: train_size, test_size)")
    if train_size <= 0 or test_size <= 0:
        raise SourceError(
            f"synthetic: train_size and test_size must be positive (got {train_size}, {test_size})"
        )
    num_classes = cfg.num_classes or 10
    g = torch.Generator().manual_seed(int(stream_rng(seed, SYNTH).integers(2**62)))
    n = train_size + test_size
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g).numpy()
    xs, xt = x[:train_size], x[train_size:]
    ys, yt = y[:train_size], y[train_size:]
    bundle = tensor_bundle(cfg, seed, "synthetic", xs, ys, xt, yt, lambda rows: rows)
    bundle.num_classes = num_classes
    return bundle
