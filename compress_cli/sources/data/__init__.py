"""Dataset sources: ``build_data(cfg, seed, input_shape) -> DataBundle``.

Sources (``data.source``):

- ``digits``: scikit-learn's embedded 8x8 digits (1797 images, 10 classes); the default.
- ``mnist`` / ``fashion_mnist``: IDX files under ``data.root`` (gzip or not), e.g. Debian's
  ``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist) or torchvision's raw layout.
- ``torchvision:NAME``: any ``torchvision.datasets`` class (``data.download`` to fetch it).
- ``imagefolder``: ``root/train`` plus ``root/val`` and/or ``root/test`` class folders.
- ``synthetic``: random inputs and labels of a given shape (latency-only runs).
- ``package.module:callable``: your own factory returning the splits.

Splitting rules, the same for every source:

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
Fashion-MNIST, synthetic) is held in ``TensorDataset``s so loaders are fast.

Every failure a user can cause raises :class:`~compress_cli.errors.SourceError` naming the path
or source and the rule.
"""

from __future__ import annotations

import gzip
import importlib
import inspect
import math
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compress_cli.errors import SourceError, did_you_mean

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset

    from compress_cli.config.recipe import DataConfig
    from compress_cli.state import DataBundle

#: the plain names ``data.source`` accepts (besides ``torchvision:NAME`` and ``module:callable``)
SOURCES = ("digits", "mnist", "fashion_mnist", "imagefolder", "synthetic")

#: standard normalisation (mean, std) per channel
MNIST_STATS = ((0.1307,), (0.3081,))
FASHION_STATS = ((0.2860,), (0.3530,))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_TORCHVISION_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "MNIST": MNIST_STATS,
    "FashionMNIST": FASHION_STATS,
    "KMNIST": ((0.1918,), (0.3483,)),
    "EMNIST": ((0.1751,), (0.3332,)),
    "QMNIST": MNIST_STATS,
    "CIFAR10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "CIFAR100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "SVHN": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "STL10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
}

#: where the IDX datasets are looked for when ``data.root`` is not set
DEFAULT_ROOTS = {
    "fashion_mnist": "/usr/share/datasets/fashion-mnist",
    "mnist": "/usr/share/datasets/mnist",
}
_IDX_SUBDIRS = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST"}

# stream ids mixed into the seed, one per random decision
_TEST, _VAL, _LIMIT_TRAIN, _LIMIT_TEST, _SYNTH = range(5)


def check_source(source: str) -> str | None:
    """A problem with the ``data.source`` name, or None; cheap (imports nothing heavy)."""
    if source in SOURCES:
        return None
    if source.startswith("torchvision:"):
        return (
            None
            if source.partition(":")[2]
            else "torchvision: needs a dataset name, e.g. torchvision:CIFAR10"
        )
    if ":" in source:
        mod, _, attr = source.partition(":")
        if mod and attr and all(p.isidentifier() for p in mod.split(".")) and attr.isidentifier():
            return None
        return f"expected package.module:callable (got {source!r})"
    return f"unknown data source {source!r}{did_you_mean(source, SOURCES)}; or torchvision:NAME, package.module:callable"


def build_data(cfg: DataConfig, seed: int, input_shape: Sequence[int] | None = None) -> DataBundle:
    """Load ``cfg.source`` and split it into a :class:`DataBundle`.

    ``input_shape`` (one sample's shape, usually ``model.input_shape``) sizes synthetic data and
    resizes imagefolder images when the data config does not say.
    """
    src = cfg.source
    problem = check_source(src)
    if problem:
        raise SourceError(f"data.source: {problem}")
    shape = list(cfg.input_shape or input_shape or []) or None
    if src in ("digits", "mnist", "fashion_mnist") and cfg.kwargs:
        raise SourceError(f"{src}: takes no data.kwargs (got {sorted(cfg.kwargs)})")
    if src == "digits":
        return _digits(cfg, seed)
    if src in ("mnist", "fashion_mnist"):
        return _idx_source(cfg, seed, src)
    if src == "synthetic":
        return _synthetic(cfg, seed, shape)
    if src == "imagefolder":
        return _imagefolder(cfg, seed, shape)
    if src.startswith("torchvision:"):
        return _torchvision(cfg, seed, src.partition(":")[2])
    return _callable(cfg, seed, src)


# --------------------------------------------------------------------------- splitting
def _rng(seed: int, stream: int) -> np.random.Generator:
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
    val, rest = stratified_take(labels, n_val, _rng(seed, _VAL))
    if limited:
        keep, _ = stratified_take(labels[rest], limit_train, _rng(seed, _LIMIT_TRAIN))  # type: ignore[arg-type]
        rest = rest[keep]
    return rest, (val if n_val else None)


def limit_indices(labels: np.ndarray, limit: int | None, seed: int, stream: int = _LIMIT_TEST) -> np.ndarray:
    """Positions of a seeded stratified subset of at most ``limit`` items (all when None)."""
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    return stratified_take(labels, limit, _rng(seed, stream))[0]


def _check_sizes(source: str, train: int, test: int, val: int | None) -> None:
    if train == 0:
        raise SourceError(f"{source}: the training split is empty (check data.limit_train / val_fraction)")
    if test == 0:
        raise SourceError(f"{source}: the test split is empty")
    if val == 0:
        raise SourceError(f"{source}: the validation split is empty")


def _bundle(
    cfg: DataConfig,
    seed: int,
    train: Dataset,
    val: Dataset | None,
    test: Dataset,
    num_classes: int,
    input_shape: Sequence[int],
) -> DataBundle:
    from compress_cli.state import DataBundle

    return DataBundle(
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


def _num_classes(cfg: DataConfig, source: str, max_label: int) -> int:
    if cfg.num_classes is not None:
        if max_label >= cfg.num_classes:
            raise SourceError(
                f"{source}: data.num_classes is {cfg.num_classes} but the data has label {max_label}"
            )
        return cfg.num_classes
    return max_label + 1


def _tensor_bundle(
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
    _check_sizes(source, len(tr), len(te), None if va is None else len(va))

    def ds(x: Any, y: np.ndarray, idx: np.ndarray) -> TensorDataset:
        rows = x[torch.from_numpy(idx)] if isinstance(x, torch.Tensor) else x[idx]
        return TensorDataset(prepare(rows), torch.as_tensor(y[idx], dtype=torch.long))

    train = ds(x_pool, y_pool, tr)
    val = ds(x_pool, y_pool, va) if va is not None else None
    test = ds(x_test, y_test, te)
    max_label = int(max(y_pool.max(initial=0), y_test.max(initial=0)))
    return _bundle(
        cfg, seed, train, val, test, _num_classes(cfg, source, max_label), train.tensors[0].shape[1:]
    )


# --------------------------------------------------------------------------- digits
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


def _digits(cfg: DataConfig, seed: int) -> DataBundle:
    import torch

    x, y = _digits_arrays()
    n_test = math.ceil(cfg.test_fraction * len(y))
    te, pool = stratified_take(y, n_test, _rng(seed, _TEST))
    tr, _ = split_train_val(y[pool], cfg.val_fraction, cfg.limit_train, seed)
    train_x = x[pool][tr].astype(np.float32) / 16.0
    mean, std = float(train_x.mean()), float(train_x.std()) or 1.0

    def prepare(rows: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(rows.astype(np.float32)).div_(16.0).sub_(mean).div_(std)
        return t.unsqueeze(1)

    return _tensor_bundle(cfg, seed, "digits", x[pool], y[pool], x[te], y[te], prepare)


# --------------------------------------------------------------------------- IDX (MNIST family)
_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path, expect_ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (plain or gzip, detected from its first bytes) into a numpy array.

    Raises SourceError on a wrong magic number, a dimension count other than ``expect_ndim``, or a
    truncated file.
    """
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise SourceError(f"{p}: cannot read IDX file: {e.strerror or e}") from None
    arr = _read_idx_cached(str(p), st.st_mtime_ns, st.st_size)
    if expect_ndim and arr.ndim != expect_ndim:
        raise SourceError(
            f"{p}: IDX file has {arr.ndim} dimensions, expected {expect_ndim} (magic number 0x0000080{expect_ndim})"
        )
    return arr


@lru_cache(maxsize=4)
def _read_idx_cached(path: str, mtime_ns: int, size: int) -> np.ndarray:
    """Parse once per (path, mtime, size): repeated runs in one process skip the gunzip."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SourceError(f"{p}: cannot read IDX file: {e.strerror or e}") from None
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise SourceError(f"{p}: corrupt or truncated gzip file ({e})") from None
    if len(data) < 4:
        raise SourceError(f"{p}: truncated IDX file ({len(data)} bytes, no header)")
    zero, code, ndim = data[:2], data[2], data[3]
    magic = int.from_bytes(data[:4], "big")
    want = "0x000008TN, e.g. 0x00000803 for images, 0x00000801 for labels"
    if zero != b"\x00\x00" or code not in _IDX_DTYPES or ndim == 0:
        raise SourceError(
            f"{p}: not an IDX file of the expected kind: magic number 0x{magic:08x}, expected {want}"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise SourceError(f"{p}: truncated IDX file (header needs {header} bytes, file has {len(data)})")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _IDX_DTYPES[code]
    count = int(np.prod(dims, dtype=np.int64))
    need = count * dtype.itemsize
    have = len(data) - header
    if have < need:
        raise SourceError(
            f"{p}: truncated IDX file: dimensions {list(dims)} need {need} data bytes, found {have}"
        )
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(dims)
    arr.setflags(write=False)
    return arr


def _idx_candidates(root: Path, source: str, split: str, kind: str) -> list[Path]:
    prefix = "train" if split == "train" else "t10k"
    ndim = 3 if kind == "images" else 1
    names = [f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"]
    folders = [root, root / "raw", root / _IDX_SUBDIRS[source] / "raw", root / _IDX_SUBDIRS[source]]
    return [folder / (name + ext) for folder in folders for name in names for ext in ("", ".gz")]


def find_idx_file(root: Path, source: str, split: str, kind: str) -> Path:
    cands = _idx_candidates(root, source, split, kind)
    for c in cands:
        if c.is_file():
            return c
    prefix = "train" if split == "train" else "t10k"
    ndim = 3 if kind == "images" else 1
    raise SourceError(
        f"{source}: no {split} {kind} file under {root} (looked for {prefix}-{kind}-idx{ndim}-ubyte[.gz] "
        f"in {root}, {root}/raw and {root}/{_IDX_SUBDIRS[source]}/raw)"
    )


def _load_idx_split(root: Path, source: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    img_path = find_idx_file(root, source, split, "images")
    lbl_path = find_idx_file(root, source, split, "labels")
    images = read_idx(img_path, expect_ndim=3)
    labels = read_idx(lbl_path, expect_ndim=1)
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        bad = img_path if images.dtype != np.uint8 else lbl_path
        raise SourceError(
            f"{bad}: expected unsigned-byte IDX data (type 0x08), got {images.dtype}/{labels.dtype}"
        )
    if len(images) != len(labels):
        raise SourceError(
            f"{img_path}: {len(images)} images but {lbl_path} has {len(labels)} labels (counts must match)"
        )
    if len(images) == 0:
        raise SourceError(f"{img_path}: the {split} split is empty")
    return images, labels.astype(np.int64)


def _idx_source(cfg: DataConfig, seed: int, source: str) -> DataBundle:
    import torch

    root = Path(cfg.root or DEFAULT_ROOTS[source]).expanduser()
    if not root.is_dir():
        hint = " (apt-get install dataset-fashion-mnist provides it)" if source == "fashion_mnist" else ""
        where = f"data.root {root}" if cfg.root else f"data.root is not set and the default {root}"
        raise SourceError(f"{source}: {where} does not exist or is not a folder{hint}")
    x_tr, y_tr = _load_idx_split(root, source, "train")
    x_te, y_te = _load_idx_split(root, source, "test")
    (mean,), (std,) = FASHION_STATS if source == "fashion_mnist" else MNIST_STATS

    def prepare(rows: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(rows)).to(torch.float32)
        return t.div_(255.0).sub_(mean).div_(std).unsqueeze(1)

    return _tensor_bundle(cfg, seed, source, x_tr, y_tr, x_te, y_te, prepare)


# --------------------------------------------------------------------------- synthetic
def _synthetic(cfg: DataConfig, seed: int, shape: list[int] | None) -> DataBundle:
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
    g = torch.Generator().manual_seed(int(_rng(seed, _SYNTH).integers(2**62)))
    n = train_size + test_size
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g).numpy()
    xs, xt = x[:train_size], x[train_size:]
    ys, yt = y[:train_size], y[train_size:]
    bundle = _tensor_bundle(cfg, seed, "synthetic", xs, ys, xt, yt, lambda rows: rows)
    bundle.num_classes = num_classes
    return bundle


# --------------------------------------------------------------------------- generic datasets
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


def _sample_shape(ds: Any, source: str) -> tuple[int, ...]:
    if len(ds) == 0:
        raise SourceError(f"{source}: the training split is empty")
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


def _generic_bundle(
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
                f"{source}: the {name} split must be a map-style Dataset with __len__ (got {type(ds).__name__})"
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
        train = Subset(train, limit_indices(labels, cfg.limit_train, seed, _LIMIT_TRAIN).tolist())
    if cfg.limit_test is not None and cfg.limit_test < len(test):
        labels = y_test if y_test is not None else np.zeros(len(test), dtype=np.int64)
        test = Subset(test, limit_indices(labels, cfg.limit_test, seed).tolist())
    _check_sizes(source, len(train), len(test), None if val is None else len(val))
    shape = _sample_shape(train, source)
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
        classes = _num_classes(cfg, source, max_label)
    return _bundle(cfg, seed, train, val, test, classes, shape)


def _classes_attr(ds: Any) -> int | None:
    from torch.utils.data import Subset

    while isinstance(ds, Subset):
        ds = ds.dataset
    classes = getattr(ds, "classes", None)
    if isinstance(classes, (list, tuple)) and len(classes) > 1:
        return len(classes)
    return None


# --------------------------------------------------------------------------- torchvision:NAME
def _default_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "compress_cli" / "datasets"


def _torchvision(cfg: DataConfig, seed: int, name: str) -> DataBundle:
    try:
        import torchvision.datasets as tvd
        from torchvision import transforms as T
    except ImportError as e:  # pragma: no cover - torchvision is a dependency
        raise SourceError(f"torchvision:{name}: torchvision is not installed ({e})") from None
    source = f"torchvision:{name}"
    cls = getattr(tvd, name, None)
    if not isinstance(cls, type):
        known = [n for n in dir(tvd) if n[:1].isupper() and isinstance(getattr(tvd, n), type)]
        raise SourceError(f"{source}: no dataset {name!r} in torchvision.datasets{did_you_mean(name, known)}")
    root = Path(cfg.root).expanduser() if cfg.root else _default_root()
    if cfg.root and not cfg.download and not root.exists():
        raise SourceError(f"{source}: data.root {root} does not exist (set data.download: true to fetch it)")
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # pragma: no cover - every torchvision dataset has a signature
        params = {}  # type: ignore[assignment]
    kwargs = dict(cfg.kwargs)
    for key in ("train", "split", "transform", "download"):
        if key in kwargs:
            raise SourceError(
                f"{source}: data.kwargs.{key} is set by compress (train and test splits are both loaded)"
            )

    def split_kw(train: bool) -> dict[str, Any]:
        if "train" in params:
            return {"train": train}
        return {"split": "train" if train else "test"}

    if "train" not in params and "split" not in params:
        raise SourceError(f"{source}: has no train/test split argument; use a package.module:callable source")

    def make(train: bool, transform: Any) -> Any:
        kw = {**kwargs, **split_kw(train)}
        if "download" in params:
            kw["download"] = cfg.download
        try:
            return cls(str(root), transform=transform, **kw)
        except TypeError as e:
            raise SourceError(f"{source}: bad data.kwargs {sorted(kwargs)}: {e}") from None
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if not cfg.download:
                raise SourceError(
                    f"{source}: files not found or unreadable under {root} ({msg}); set data.download: true "
                    "or point data.root at the files"
                ) from None
            raise SourceError(f"{source}: could not load or download into {root}: {msg}") from None

    stats = _TORCHVISION_STATS.get(name)
    if stats is None:
        probe = make(True, T.ToTensor())
        channels = _sample_shape(probe, source)[0]
        stats = IMAGENET_STATS if channels == 3 else ((0.5,) * channels, (0.5,) * channels)
    tf = T.Compose([T.ToTensor(), T.Normalize(*stats)])
    train = make(True, tf)
    test = make(False, tf)
    return _generic_bundle(cfg, seed, source, train, None, test)


# --------------------------------------------------------------------------- imagefolder
def _imagefolder(cfg: DataConfig, seed: int, shape: list[int] | None) -> DataBundle:
    from torchvision import datasets as tvd
    from torchvision import transforms as T

    if not cfg.root:
        raise SourceError("imagefolder: data.root is required (a folder holding train/ and val/ or test/)")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise SourceError(f"imagefolder: data.root {root} does not exist or is not a folder")
    train_dir = root / "train"
    val_dir, test_dir = root / "val", root / "test"
    if not train_dir.is_dir():
        raise SourceError(
            f"imagefolder: {train_dir} is missing (expected {root}/train/CLASS/*.png and val/ or test/)"
        )
    if not (val_dir.is_dir() or test_dir.is_dir()):
        raise SourceError(f"imagefolder: {root} needs a val/ or test/ folder next to train/")
    kw = dict(cfg.kwargs)
    resize = kw.pop("resize", None)
    if kw:
        raise SourceError(f"imagefolder: unknown data.kwargs {sorted(kw)} (allowed: resize)")
    size: tuple[int, int] | None = None
    if resize is not None:
        try:
            size = (
                (int(resize), int(resize))
                if isinstance(resize, (int, float))
                else (int(resize[0]), int(resize[1]))
            )
        except (TypeError, ValueError, IndexError):
            raise SourceError(
                f"imagefolder: data.kwargs.resize must be a size or [H, W] (got {resize!r})"
            ) from None
    elif shape and len(shape) == 3:
        size = (int(shape[1]), int(shape[2]))
    channels = int(shape[0]) if shape and len(shape) == 3 else 3
    steps: list[Any] = []
    mean: tuple[float, ...]
    std: tuple[float, ...]
    if size:
        steps.append(T.Resize(size))
    if channels == 1:
        steps.append(T.Grayscale(1))
        mean, std = (0.449,), (0.226,)
    else:
        mean, std = IMAGENET_STATS
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    tf = T.Compose(steps)

    def folder(path: Path) -> Any:
        try:
            return tvd.ImageFolder(str(path), transform=tf)
        except (FileNotFoundError, OSError, RuntimeError) as e:
            raise SourceError(
                f"imagefolder: {path}: {e} (expected one sub-folder of images per class)"
            ) from None

    train = folder(train_dir)
    test = folder(test_dir if test_dir.is_dir() else val_dir)
    val = folder(val_dir) if test_dir.is_dir() and val_dir.is_dir() else None
    for ds in (test, val):
        if ds is not None and ds.classes != train.classes:
            raise SourceError(
                f"imagefolder: {ds.root} has classes {ds.classes} but {train_dir} has {train.classes} "
                "(the class folders must match)"
            )
    return _generic_bundle(
        cfg, seed, "imagefolder", train, val, test, classes=cfg.num_classes or len(train.classes)
    )


# --------------------------------------------------------------------------- package.module:callable
def _callable(cfg: DataConfig, seed: int, source: str) -> DataBundle:
    mod_name, _, attr = source.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise SourceError(f"data.source {source}: cannot import module {mod_name!r}: {e}") from None
    except Exception as e:
        raise SourceError(
            f"data.source {source}: importing module {mod_name!r} failed: {type(e).__name__}: {e}"
        ) from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise SourceError(
            f"data.source {source}: module {mod_name!r} has no callable {attr!r}{did_you_mean(attr, names)}"
        )
    kwargs = dict(cfg.kwargs)
    if cfg.root is not None:
        kwargs.setdefault("root", cfg.root)
    try:
        out = fn(**kwargs)
    except SourceError:
        raise
    except Exception as e:
        raise SourceError(
            f"data.source {source}: calling {attr}(**{sorted(kwargs)}) failed: {type(e).__name__}: {e}"
        ) from None
    if isinstance(out, dict):
        missing = [k for k in ("train", "test") if out.get(k) is None]
        extra = sorted(set(out) - {"train", "val", "test"})
        if missing or extra:
            raise SourceError(
                f"data.source {source}: returned a dict with keys {sorted(out)}; expected train, test and optionally val"
            )
        train, val, test = out["train"], out.get("val"), out["test"]
    elif isinstance(out, (tuple, list)) and len(out) in (2, 3):
        train, val, test = (out[0], None, out[1]) if len(out) == 2 else tuple(out)
    else:
        raise SourceError(
            f"data.source {source}: must return {{'train', 'test'[, 'val']}} or (train, test) or (train, val, test) "
            f"datasets (got {type(out).__name__})"
        )
    nc = cfg.num_classes if cfg.num_classes is not None else cfg.kwargs.get("num_classes")
    if nc is not None and (not isinstance(nc, int) or nc < 2):
        raise SourceError(f"data.source {source}: num_classes must be an integer >= 2 (got {nc!r})")
    return _generic_bundle(cfg, seed, source, train, val, test, classes=nc)
