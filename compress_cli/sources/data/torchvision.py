"""``torchvision:NAME``: any ``torchvision.datasets`` class with a train/test split argument
(``data.download`` to fetch it), normalised with the dataset's known per-channel statistics."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress_cli.errors import SourceError, did_you_mean
from compress_cli.sources.data.idx import FASHION_STATS, MNIST_STATS
from compress_cli.sources.data.registry import register_source
from compress_cli.sources.data.splits import dataset_bundle, sample_shape

if TYPE_CHECKING:
    from compress_cli.config.recipe import DataConfig
    from compress_cli.sources.data.bundle import DataBundle

#: standard normalisation (mean, std) per channel
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


def _default_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "compress_cli" / "datasets"


def _check_name(name: str) -> str | None:
    return None if name else "torchvision: needs a dataset name, e.g. torchvision:CIFAR10"


@register_source("torchvision:NAME", check=_check_name)
def build_torchvision(cfg: DataConfig, seed: int, name: str, _shape: list[int] | None) -> DataBundle:
    """``torchvision.datasets.NAME``'s train and test splits under ``data.root`` (default: the user
    cache; ``data.download`` fetches them), normalised with the dataset's known statistics."""
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
        channels = sample_shape(probe, source)[0]
        stats = IMAGENET_STATS if channels == 3 else ((0.5,) * channels, (0.5,) * channels)
    tf = T.Compose([T.ToTensor(), T.Normalize(*stats)])
    train = make(True, tf)
    test = make(False, tf)
    return dataset_bundle(cfg, seed, source, train, None, test)
