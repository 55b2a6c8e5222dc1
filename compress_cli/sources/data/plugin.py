"""``package.module:callable``: your own factory returning the splits (any ``x:y`` source that no
registered name claims)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from compress_cli.errors import SourceError, did_you_mean
from compress_cli.sources.data.registry import register_source
from compress_cli.sources.data.splits import dataset_bundle

if TYPE_CHECKING:
    from compress_cli.config.recipe import DataConfig
    from compress_cli.sources.data.bundle import DataBundle


def _check_reference(source: str) -> str | None:
    mod, _, attr = source.partition(":")
    if mod and attr and all(p.isidentifier() for p in mod.split(".")) and attr.isidentifier():
        return None
    return f"expected package.module:callable (got {source!r})"


@register_source("package.module:callable", check=_check_reference, fallback=True)
def build_plugin(cfg: DataConfig, seed: int, source: str, _shape: list[int] | None) -> DataBundle:
    """Call the user's factory ``package.module:callable`` with ``data.kwargs`` (and ``root``) and
    split what it returns: ``{'train', 'test'[, 'val']}``, ``(train, test)`` or ``(train, val, test)``."""
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
                f"data.source {source}: returned a dict with keys {sorted(out)}; "
                "expected train, test and optionally val"
            )
        train, val, test = out["train"], out.get("val"), out["test"]
    elif isinstance(out, (tuple, list)) and len(out) in (2, 3):
        train, val, test = (out[0], None, out[1]) if len(out) == 2 else tuple(out)
    else:
        raise SourceError(
            f"data.source {source}: must return {{'train', 'test'[, 'val']}} or (train, test) "
            f"or (train, val, test) datasets (got {type(out).__name__})"
        )
    nc = cfg.num_classes if cfg.num_classes is not None else cfg.kwargs.get("num_classes")
    if nc is not None and (not isinstance(nc, int) or nc < 2):
        raise SourceError(f"data.source {source}: num_classes must be an integer >= 2 (got {nc!r})")
    return dataset_bundle(cfg, seed, source, train, val, test, classes=nc)
