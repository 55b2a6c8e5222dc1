"""How every source is split, the same for all of them.

- a source without its own test split (digits, synthetic without ``test_size``) gets a stratified,
  seeded ``test_fraction`` held out;
- validation is carved (stratified when labels are cheap to read, seeded) from the training split
  with ``val_fraction``, unless the source gives its own; ``val_fraction: 0`` means no validation set
  (loaders then fall back to the test set);
- ``limit_train`` caps the training split at exactly that many samples (seeded, stratified); the
  validation split then shrinks in proportion (``val_fraction`` of train + val);
- ``limit_test`` caps the test split the same way.

Each split draws from its own random stream derived from the seed, so e.g. the test split does not
move when ``val_fraction`` or ``limit_train`` change. Data that fits in memory (digits, MNIST,
Fashion-MNIST, synthetic) is held in ``TensorDataset``s so loaders are fast
(:func:`tensor_bundle`); other datasets are subset lazily (:func:`dataset_bundle`), their labels
read without loading inputs when the dataset exposes them.

Samples may be ``(input, label)`` pairs, tuples of several inputs with the label last, dicts of
tensors (the label under ``labels``/``label``/``target``/``targets``/``y``, as tasks read them), or
inputs alone: data without labels is ``labelled=False`` with ``num_classes`` None (tasks that need
labels refuse it). Labels that are not class indices (e.g. regression targets) leave
``num_classes`` None unless ``data.num_classes`` sets it; splits and limits are then random
instead of stratified.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from compress_cli.errors import SourceError
from compress_cli.sources.data.bundle import DataBundle

if TYPE_CHECKING:
    import torch

    from compress_cli.config.recipe import DataConfig

#: stream ids mixed into the seed, one per random decision
TEST, VAL, LIMIT_TRAIN, LIMIT_TEST, SYNTH = range(5)


def stream_rng(seed: int, stream: int) -> np.random.Generator:
    """The random generator of one decision (``stream``: TEST, VAL, ...) under ``seed``."""
    return np.random.default_rng([abs(int(seed)), stream, 0 if seed >= 0 else 1])


def stratified_take(labels: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Pick ``k`` positions of ``labels`` keeping class proportions; returns (taken, rest), sorted.

    Each class gets ``k * n_c / n`` rounded by largest remainder (ties broken at random), so the
    total is exactly ``k``.
    """
    n = len(labels)
    k = max(0, min(int(k), n))
    if k == 0 or k == n:
        idx = np.arange(n)
        return (idx, idx[:0]) if k == n else (idx[:0], idx)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    exact = counts * (k / n)
    quota = np.floor(exact).astype(np.int64)
    short = k - int(quota.sum())
    if short:
        frac = exact - quota
        order = np.lexsort((rng.random(len(classes)), -frac))  # largest remainder, random tie-break
        quota[order[:short]] += 1
    taken = []
    for c in range(len(classes)):
        members = np.flatnonzero(inverse == c)
        taken.append(rng.permutation(members)[: quota[c]])
    take = np.sort(np.concatenate(taken))
    mask = np.ones(n, dtype=bool)
    mask[take] = False
    return take, np.flatnonzero(mask)


def split_train_val(
    labels: np.ndarray, val_fraction: float, limit_train: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Positions for (train, val) within a training pool; val is None when ``val_fraction`` is 0."""
    n = len(labels)
    n_val = math.ceil(val_fraction * n) if val_fraction > 0 else 0
    limited = limit_train is not None and limit_train < n - n_val
    if limited:
        assert limit_train is not None
        n_val = min(n_val, math.ceil(val_fraction * limit_train / (1 - val_fraction)))
    val, rest = stratified_take(labels, n_val, stream_rng(seed, VAL))
    if limited:
        limit_rng = stream_rng(seed, LIMIT_TRAIN)
        keep, _ = stratified_take(labels[rest], limit_train, limit_rng)  # type: ignore[arg-type]
        rest = rest[keep]
    return rest, (val if n_val else None)


def limit_indices(labels: np.ndarray, limit: int | None, seed: int, stream: int = LIMIT_TEST) -> np.ndarray:
    """Positions of a seeded stratified subset of at most ``limit`` items (all when None)."""
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    return stratified_take(labels, limit, stream_rng(seed, stream))[0]


def check_sizes(source: str, train: int, test: int, val: int | None) -> None:
    """Raise SourceError naming the first empty split."""
    if train == 0:
        raise SourceError(f"{source}: the training split is empty (check data.limit_train / val_fraction)")
    if test == 0:
        raise SourceError(f"{source}: the test split is empty")
    if val == 0:
        raise SourceError(f"{source}: the validation split is empty")


def class_count(cfg: DataConfig, source: str, max_label: int) -> int:
    """``data.num_classes`` when set (checked against the largest label seen), else largest label + 1."""
    if cfg.num_classes is not None:
        if max_label >= cfg.num_classes:
            raise SourceError(
                f"{source}: data.num_classes is {cfg.num_classes} but the data has label {max_label}"
            )
        return cfg.num_classes
    return max_label + 1


def tensor_bundle(
    cfg: DataConfig,
    seed: int,
    source: str,
    x_pool: torch.Tensor | np.ndarray,
    y_pool: np.ndarray,
    x_test: torch.Tensor | np.ndarray,
    y_test: np.ndarray,
    prepare: Callable[[Any], torch.Tensor],
) -> DataBundle:
    """Split a training pool into train/val, limit test, and wrap everything in TensorDatasets.

    ``prepare`` turns the selected raw rows into float tensors (conversion happens after selection
    so limited runs on big datasets stay cheap).
    """
    import torch
    from torch.utils.data import TensorDataset

    tr, va = split_train_val(y_pool, cfg.val_fraction, cfg.limit_train, seed)
    te = limit_indices(y_test, cfg.limit_test, seed)
    check_sizes(source, len(tr), len(te), None if va is None else len(va))

    def ds(x: Any, y: np.ndarray, idx: np.ndarray) -> TensorDataset:
        rows = x[torch.from_numpy(idx)] if isinstance(x, torch.Tensor) else x[idx]
        return TensorDataset(prepare(rows), torch.as_tensor(y[idx], dtype=torch.long))

    train = ds(x_pool, y_pool, tr)
    val = ds(x_pool, y_pool, va) if va is not None else None
    test = ds(x_test, y_test, te)
    max_label = int(max(y_pool.max(initial=0), y_test.max(initial=0)))
    return DataBundle.from_config(
        cfg, seed, train, val, test, class_count(cfg, source, max_label), train.tensors[0].shape[1:]
    )


def dataset_labels(ds: Any, scan: bool = False) -> np.ndarray | None:
    """Labels of a dataset without loading its inputs when possible (``targets``, ``labels``,
    ``samples``, TensorDataset, Subset); with ``scan`` iterate over it as a last resort."""
    from torch.utils.data import Subset, TensorDataset

    if isinstance(ds, Subset):
        inner = dataset_labels(ds.dataset, scan=False)
        if inner is not None:
            return inner[np.asarray(ds.indices, dtype=np.int64)]
    elif isinstance(ds, TensorDataset) and len(ds.tensors) >= 2:
        return _as_label_array(ds.tensors[1])
    else:
        for attr in ("targets", "labels", "_labels", "y"):
            val = getattr(ds, attr, None)
            if val is not None:
                arr = _as_label_array(val)
                if arr is not None and len(arr) == len(ds):
                    return arr
        samples = getattr(ds, "samples", None)
        if (
            isinstance(samples, list)
            and samples
            and isinstance(samples[0], tuple)
            and len(samples) == len(ds)
        ):
            return _as_label_array([s[1] for s in samples])
    if not scan:
        return None
    try:
        found = [target_of(ds[i]) for i in range(len(ds))]
        if any(t is None for t in found):
            return None
        return _as_label_array([int(t) for t in found])
    except (TypeError, ValueError, RuntimeError):
        return None


def _as_label_array(val: Any) -> np.ndarray | None:
    try:
        if hasattr(val, "detach"):
            val = val.detach().cpu().numpy()
        arr = np.asarray(val)
    except (TypeError, ValueError):
        return None
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        if arr.ndim == 1 and arr.dtype.kind == "f" and np.all(np.mod(arr, 1) == 0):
            return arr.astype(np.int64)
        return None
    return arr.astype(np.int64)


def target_of(sample: Any) -> Any:
    """The label of one sample, or None when it has none: the last element of a tuple of two or
    more, a dict's ``labels``/``label``/``target``/``targets``/``y`` (the keys tasks take)."""
    from compress_cli.tasks.base import TARGET_KEYS

    if isinstance(sample, Mapping):
        return next((sample[k] for k in TARGET_KEYS if k in sample), None)
    if isinstance(sample, (tuple, list)) and len(sample) >= 2:
        return sample[-1]
    return None


def sample_info(ds: Any, source: str) -> tuple[tuple[int, ...], bool]:
    """(the input shape of the first training sample, whether samples carry a label). The shape is
    ``()`` for structured inputs (dicts, several tensors): the bundle's example batches describe
    those. SourceError when the sample cannot be read or a single input is not a tensor."""
    if len(ds) == 0:
        raise SourceError(f"{source}: the training split is empty")
    try:
        sample = ds[0]
    except Exception as e:
        raise SourceError(f"{source}: cannot read the first sample: {type(e).__name__}: {e}") from None
    if isinstance(sample, Mapping):
        return (), target_of(sample) is not None
    labelled = isinstance(sample, (tuple, list)) and len(sample) >= 2
    inputs = sample[:-1] if labelled else sample
    if isinstance(inputs, (tuple, list)):
        if len(inputs) != 1:
            return (), labelled
        inputs = inputs[0]
    if isinstance(inputs, Mapping):
        return (), labelled
    shape = getattr(inputs, "shape", None)
    if shape is None:
        raise SourceError(
            f"{source}: samples must be tensors (got {type(inputs).__name__}; add a ToTensor transform)"
        )
    return tuple(int(d) for d in shape), labelled


def sample_shape(ds: Any, source: str) -> tuple[int, ...]:
    """The shape of the first training sample's input (``()`` for structured inputs)."""
    return sample_info(ds, source)[0]


def dataset_bundle(
    cfg: DataConfig,
    seed: int,
    source: str,
    train: Any,
    val: Any | None,
    test: Any,
    classes: int | None = None,
) -> DataBundle:
    """Subset lazy datasets: carve val (unless given), apply limits; infer classes and shape."""
    from torch.utils.data import Subset

    for name, ds in (("train", train), ("test", test), ("val", val)):
        if ds is None:
            continue
        if not hasattr(ds, "__len__") or not hasattr(ds, "__getitem__"):
            raise SourceError(
                f"{source}: the {name} split must be a map-style Dataset with __len__ "
                f"(got {type(ds).__name__})"
            )
        if len(ds) == 0:
            raise SourceError(f"{source}: the {name} split is empty")
    y_train = dataset_labels(train)
    y_test = dataset_labels(test)
    if val is None:
        labels = y_train if y_train is not None else np.zeros(len(train), dtype=np.int64)
        tr, va = split_train_val(labels, cfg.val_fraction, cfg.limit_train, seed)
        val = Subset(train, va.tolist()) if va is not None else None
        train = Subset(train, tr.tolist()) if len(tr) != len(train) else train
    elif cfg.limit_train is not None and cfg.limit_train < len(train):
        labels = y_train if y_train is not None else np.zeros(len(train), dtype=np.int64)
        train = Subset(train, limit_indices(labels, cfg.limit_train, seed, LIMIT_TRAIN).tolist())
    if cfg.limit_test is not None and cfg.limit_test < len(test):
        labels = y_test if y_test is not None else np.zeros(len(test), dtype=np.int64)
        test = Subset(test, limit_indices(labels, cfg.limit_test, seed).tolist())
    check_sizes(source, len(train), len(test), None if val is None else len(val))
    shape, labelled = sample_info(train, source)
    if not labelled:
        return DataBundle.from_config(cfg, seed, train, val, test, None, shape, labelled=False)
    if classes is None:
        classes = cfg.num_classes
    if classes is None:
        classes = _classes_attr(train)
    if classes is None:
        ys = [dataset_labels(d, scan=True) for d in (train, test)]
        if all(y is not None for y in ys):  # class indices; else (regression targets, ...) no classes
            classes = class_count(cfg, source, max(int(y.max(initial=0)) for y in ys if y is not None))
    return DataBundle.from_config(cfg, seed, train, val, test, classes, shape)


def _classes_attr(ds: Any) -> int | None:
    from torch.utils.data import Subset

    while isinstance(ds, Subset):
        ds = ds.dataset
    classes = getattr(ds, "classes", None)
    if isinstance(classes, (list, tuple)) and len(classes) > 1:
        return len(classes)
    return None
