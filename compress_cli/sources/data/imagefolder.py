"""``imagefolder``: ``root/train`` plus ``root/val`` and/or ``root/test``, one sub-folder of images
per class (torchvision's ``ImageFolder``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress_cli.errors import SourceError
from compress_cli.sources.data.registry import register_source
from compress_cli.sources.data.splits import dataset_bundle
from compress_cli.sources.data.torchvision import IMAGENET_STATS

if TYPE_CHECKING:
    from compress_cli.config.recipe import DataConfig
    from compress_cli.sources.data.bundle import DataBundle


@register_source("imagefolder")
def build_imagefolder(cfg: DataConfig, seed: int, _argument: str, shape: list[int] | None) -> DataBundle:
    """Class folders under ``data.root``: ``train/`` plus ``val/`` and/or ``test/``, resized to
    ``data.kwargs.resize`` or the sample shape, normalised with ImageNet (or grey) statistics."""
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
    return dataset_bundle(
        cfg, seed, "imagefolder", train, val, test, classes=cfg.num_classes or len(train.classes)
    )
