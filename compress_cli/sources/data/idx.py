"""The MNIST family from IDX files: ``mnist`` and ``fashion_mnist`` under ``data.root`` (gzip or
not), e.g. Debian's ``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist) or torchvision's
raw layout. The IDX reader checks magic numbers, dimensions and sizes, and caches a parsed file per
(path, mtime, size) so repeated runs in one process skip the gunzip."""

from __future__ import annotations

import gzip
import struct
import zlib
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compress_cli.errors import SourceError
from compress_cli.sources.data.registry import register_source
from compress_cli.sources.data.splits import tensor_bundle

if TYPE_CHECKING:
    import torch

    from compress_cli.config.recipe import DataConfig
    from compress_cli.sources.data.bundle import DataBundle

#: standard normalisation (mean, std) per channel
MNIST_STATS = ((0.1307,), (0.3081,))
FASHION_STATS = ((0.2860,), (0.3530,))

#: where the IDX datasets are looked for when ``data.root`` is not set
DEFAULT_ROOTS = {
    "fashion_mnist": "/usr/share/datasets/fashion-mnist",
    "mnist": "/usr/share/datasets/mnist",
}
_IDX_SUBDIRS = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST"}

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
            f"{p}: IDX file has {arr.ndim} dimensions, expected {expect_ndim} "
            f"(magic number 0x0000080{expect_ndim})"
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
    """The ``split`` (train/test) ``kind`` (images/labels) file of ``source`` under ``root``, in the
    flat, ``raw/`` or torchvision layout, plain or gzip; SourceError listing where it looked."""
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

    return tensor_bundle(cfg, seed, source, x_tr, y_tr, x_te, y_te, prepare)


@register_source("mnist", kwargs=False)
def build_mnist(cfg: DataConfig, seed: int, _argument: str, _shape: list[int] | None) -> DataBundle:
    """MNIST from IDX files under ``data.root`` (default :data:`DEFAULT_ROOTS`)."""
    return _idx_source(cfg, seed, "mnist")


@register_source("fashion_mnist", kwargs=False)
def build_fashion_mnist(cfg: DataConfig, seed: int, _argument: str, _shape: list[int] | None) -> DataBundle:
    """Fashion-MNIST from IDX files under ``data.root`` (default :data:`DEFAULT_ROOTS`)."""
    return _idx_source(cfg, seed, "fashion_mnist")
