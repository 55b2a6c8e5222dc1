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
"""

from __future__ import annotations

import math
from collections.abc import Callable
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
        return _as_label_array([int(_split_sample(ds[i], "dataset")[1]) for i in range(len(ds))])
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


def _split_sample(sample: Any, source: str) -> tuple[Any, Any]:
    if isinstance(sample, (tuple, list)) and len(sample) >= 2:
        return sample[0], sample[1]
    raise SourceError(f"{source}: each sample must be an (input, label) pair (got {type(sample).__name__})")


def _structured(sample: Any) -> bool:
    """Whether a sample is a dict (keyword inputs, Hugging Face style): its structure, not an
    ``(input, label)`` pair, says what the model gets (the task splits it)."""
    from collections.abc import Mapping

    return isinstance(sample, Mapping)


def sample_shape(ds: Any, source: str) -> tuple[int, ...]:
    """The shape of the first training sample's input (``()`` for dict samples: the data bundle's
    ``example_input`` gives their structure); SourceError when it is not a tensor."""
    if len(ds) == 0:
        raise SourceError(f"{source}: the training split is empty")
    if _structured(ds[0]):
        return ()
    try:
        x, _ = _split_sample(ds[0], source)
    except SourceError:
        raise
    except Exception as e:
        raise SourceError(f"{source}: cannot read the first sample: {type(e).__name__}: {e}") from None
    shape = getattr(x, "shape", None)
    if shape is None:
        raise SourceError(
            f"{source}: samples must be tensors (got {type(x).__name__}; add a ToTensor transform)"
        )
    return tuple(int(d) for d in shape)


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
    shape = sample_shape(train, source)
    first = train[0]
    if _structured(first) and not any(k in first for k in ("labels", "label", "target", "targets", "y")):
        bundle = DataBundle.from_config(cfg, seed, train, val, test, classes or cfg.num_classes or 0, shape)
        bundle.labelled = False  # dict samples without a label key: label-free tasks only
        return bundle
    if classes is None:
        classes = cfg.num_classes
    if classes is None:
        classes = _classes_attr(train)
    if classes is None:
        ys = [dataset_labels(d, scan=True) for d in (train, test)]
        max_label = (
            max(int(y.max(initial=0)) for y in ys if y is not None) if any(y is not None for y in ys) else -1
        )
        if max_label < 0:
            raise SourceError(f"{source}: cannot infer the number of classes; set data.num_classes")
        classes = class_count(cfg, source, max_label)
    return DataBundle.from_config(cfg, seed, train, val, test, classes, shape)


def _classes_attr(ds: Any) -> int | None:
    from torch.utils.data import Subset

    while isinstance(ds, Subset):
        ds = ds.dataset
    classes = getattr(ds, "classes", None)
    if isinstance(classes, (list, tuple)) and len(classes) > 1:
        return len(classes)
    return None
