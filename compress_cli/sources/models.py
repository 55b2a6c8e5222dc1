"""Model sources: ``zoo:NAME``, ``torchvision:NAME``, ``package.module:callable``, a compressed
model directory; checkpoints as state_dict ``.pt/.pth`` (weights_only), ``.safetensors``, or a
compressed model directory. A fully pickled module only with ``allow_pickle: true``."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress_cli.errors import SourceError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from compress_cli.config.recipe import ModelConfig
    from compress_cli.state import DataBundle


def build_from_source(spec: dict[str, Any]) -> nn.Module:
    """Build the architecture named by ``{"source": ..., "kwargs": {...}}`` (random init)."""
    import torch

    source = spec["source"]
    kwargs = dict(spec.get("kwargs") or {})
    kind, _, name = source.partition(":")
    # Same random init for the same source, whatever the global RNG is doing.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if kind == "zoo" and name:
            from compress_cli.sources.zoo import build_zoo

            model = build_zoo(name, **kwargs)
        elif kind == "torchvision" and name:
            model = _torchvision(name, kwargs)
        elif name and "." in kind or (name and kind.isidentifier()):
            model = _callable(kind, name, kwargs)
        else:
            from compress_cli.checkpoint import is_model_dir, load

            if is_model_dir(source):
                return load(source)
            raise SourceError(
                f"model.source {source!r}: expected zoo:NAME, torchvision:NAME, package.module:callable "
                "or a compressed model directory"
            )
    from torch import nn

    if not isinstance(model, nn.Module):
        raise SourceError(f"model.source {source!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _torchvision(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision

    from compress_cli.errors import did_you_mean

    known = torchvision.models.list_models()
    if name not in known:
        raise SourceError(f"model.source torchvision:{name}: unknown model{did_you_mean(name, known)}")
    kwargs.setdefault("weights", None)
    try:
        return torchvision.models.get_model(name, **kwargs)
    except TypeError as e:
        raise SourceError(f"model.source torchvision:{name}: bad kwargs: {e}") from None


def _callable(module: str, attr: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise SourceError(f"model.source {module}:{attr}: cannot import {module!r} ({e})") from None
    fn = getattr(mod, attr, None)
    if fn is None or not callable(fn):
        raise SourceError(f"model.source {module}:{attr}: {module!r} has no callable {attr!r}")
    try:
        return fn(**kwargs)
    except TypeError as e:
        raise SourceError(f"model.source {module}:{attr}: bad kwargs: {e}") from None


def read_state_dict(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor] | nn.Module:
    """A checkpoint file's tensors (or a whole module, only with allow_pickle)."""
    import pickle

    import torch

    p = Path(path)
    if not p.exists():
        raise SourceError(f"model.checkpoint {p}: file not found")
    if p.is_dir():
        raise SourceError(
            f"model.checkpoint {p}: a directory without {'manifest.json'} (not a compressed model)"
        )
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as e:
            raise SourceError(f"model.checkpoint {p}: corrupt or truncated safetensors file ({e})") from None
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():
            raise SourceError(
                f"model.checkpoint {p}: corrupt or not a PyTorch checkpoint ({str(e).splitlines()[0]})"
            ) from None
        if not allow_pickle:
            raise SourceError(
                f"model.checkpoint {p}: not a plain state_dict (it contains pickled objects: {_pickle_reason(e)}); "
                "loading it would run code from the file. If you trust it, set model.allow_pickle: true"
            ) from None
        obj = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # zip/pickle/storage errors of a damaged or foreign file
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise SourceError(f"model.checkpoint {p}: corrupt or truncated checkpoint ({first})") from None
    from torch import nn

    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {k.removeprefix("module."): v for k, v in obj.items()}
    raise SourceError(f"model.checkpoint {p}: expected a state_dict of tensors (got {type(obj).__name__})")


def load_state_dict_checked(model: nn.Module, sd: dict[str, torch.Tensor], origin: str) -> None:
    """Load ``sd`` strictly; on mismatch name the missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:

        def few(xs: list[str]) -> str:
            return ", ".join(xs[:5]) + (f" (+{len(xs) - 5} more)" if len(xs) > 5 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {few(unexpected)}")
        if shapes:
            parts.append(f"mis-shaped: {few(shapes)}")
        raise SourceError(f"{origin}: checkpoint does not match the model architecture; " + "; ".join(parts))
    if getattr(sd, "_metadata", None) is None:  # module versions (MNASNet refuses a state without them)
        from collections import OrderedDict

        sd = OrderedDict(sd)
        sd._metadata = getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    model.load_state_dict(sd, strict=True)


def load_model(cfg: ModelConfig) -> tuple[nn.Module, dict[str, Any]]:
    """The model named by the recipe, with its checkpoint loaded. Returns (model, base spec).

    The base spec is what the compressed checkpoint's manifest will rebuild from.
    """
    from compress_cli.checkpoint import is_model_dir, load, read_manifest

    spec = {"source": cfg.source, "kwargs": dict(cfg.kwargs)}
    if is_model_dir(cfg.source):
        return load(cfg.source), read_manifest(cfg.source)["model"]
    if cfg.checkpoint and is_model_dir(cfg.checkpoint):
        manifest = read_manifest(cfg.checkpoint)
        if manifest["model"]["source"] != cfg.source:
            raise SourceError(
                f"model.checkpoint {cfg.checkpoint}: was made from {manifest['model']['source']!r}, "
                f"not from model.source {cfg.source!r}"
            )
        return load(cfg.checkpoint), manifest["model"]
    model = build_from_source(spec)
    if cfg.checkpoint:
        sd = read_state_dict(cfg.checkpoint, cfg.allow_pickle)
        from torch import nn

        if isinstance(sd, nn.Module):
            return sd, spec
        load_state_dict_checked(model, sd, f"model.checkpoint {cfg.checkpoint}")
    return model, spec


def _pickle_reason(e: Exception) -> str:
    for line in str(e).splitlines():
        if "global" in line.lower():
            return line.strip().rstrip(".")
    return "objects other than tensors"


def check_model_fits_data(model: nn.Module, data: DataBundle) -> None:
    """One forward pass on a data sample: the input shape must fit and the output must be
    (batch, classes) logits with as many classes as the data has (SourceError otherwise)."""
    import torch

    x = data.example_input(2)
    try:
        with torch.no_grad():
            model.eval()
            y = model(x)
    except Exception as e:
        raise SourceError(
            f"model does not accept the data's input shape {list(data.input_shape)} "
            f"({type(e).__name__}: {str(e).splitlines()[0]}); check model.input_shape / the data source"
        ) from None
    if not isinstance(y, torch.Tensor) or y.dim() != 2:
        raise SourceError(
            f"model output should be (batch, classes) logits, got {getattr(y, 'shape', type(y))}"
        )
    if data.labelled and y.shape[1] != data.num_classes:
        raise SourceError(
            f"model outputs {y.shape[1]} classes but the data has {data.num_classes} "
            "(set model.kwargs.num_classes)"
        )
