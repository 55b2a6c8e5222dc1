"""Model sources -> modules: the one place a ``model.source`` becomes an ``nn.Module``.

Sources (grammar in ``sources.spec``): ``zoo:NAME``, ``torchvision:NAME``, ``timm:NAME``,
``hf:PATH_OR_NAME`` (``sources.hf``), ``package.module:callable``, a compressed model directory;
checkpoints as state_dict ``.pt/.pth`` (weights_only), ``.safetensors``,
or a compressed model directory. A fully pickled module only with ``allow_pickle: true``. A model
directory is data: the source its manifest names is built here only when it is built-in, or the
caller trusts it (``trust_source``), so loading a shared directory never runs code from it.
"""

from __future__ import annotations

import importlib
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress_cli.errors import SourceError
from compress_cli.sources.spec import manifest_source_problem, parse_model_source

if TYPE_CHECKING:
    import torch
    from torch import nn

    from compress_cli.config.recipe import ModelConfig, Recipe


def build_from_source(spec: dict[str, Any], *, weights: bool = False) -> nn.Module:
    """Build the architecture named by ``{"source": ..., "kwargs": {...}}`` (random init, the same
    for the same source whatever the global RNG is doing). A compressed model directory is not
    built but loaded (``load_model_dir``).

    ``weights``: also load the weights the source itself ships, for the sources that have them
    (``timm:`` with ``kwargs.pretrained: true``, which may download from the hub; ``hf:`` from its
    directory). Without it those are built from their configuration alone: what a manifest
    rebuilds from, so loading a model directory never downloads nor reads the original files."""
    import torch

    source = spec["source"]
    kwargs = dict(spec.get("kwargs") or {})
    try:
        parsed = parse_model_source(source)
    except ValueError as e:
        raise SourceError(f"model.source {source!r}: {e}") from None
    if parsed.kind == "directory":
        raise SourceError(
            f"model.source {source!r}: expected zoo:NAME, torchvision:NAME or package.module:callable "
            "(a compressed model directory is loaded, not built)"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if parsed.kind == "zoo":
            from compress_cli.sources.zoo import build_zoo

            model = build_zoo(parsed.name, **kwargs)
        elif parsed.kind == "torchvision":
            model = _torchvision(parsed.name, kwargs)
        elif parsed.kind == "timm":
            model = _timm(parsed.name, kwargs, weights)
        elif parsed.kind == "hf":
            from compress_cli.sources.hf import build_hf

            model = build_hf(parsed.name, kwargs, weights)
        else:
            model = _callable(parsed.name, parsed.attr, kwargs)
    from torch import nn

    if not isinstance(model, nn.Module):
        raise SourceError(f"model.source {source!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_model_dir(
    directory: str | Path, *, trust_source: bool | Collection[str] = False, apply_transforms: bool = True
) -> nn.Module:
    """Rebuild a compressed model directory (eval mode).

    Its manifest may name a built-in source only, unless ``trust_source`` is True or lists the
    ``package.module:callable`` it names: otherwise SourceError, before anything is imported.
    """
    from compress_cli.checkpoint import MANIFEST, load

    def base(spec: dict[str, Any]) -> nn.Module:
        problem = manifest_source_problem(spec["source"], trust_source)
        if problem:
            raise SourceError(f"{Path(directory) / MANIFEST}: {problem}")
        return build_from_source(spec)

    return load(directory, base, apply_transforms=apply_transforms)


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


#: ``timm.create_model`` arguments that read files (a checkpoint may be a pickle): refused, so a
#: manifest naming ``timm:`` never makes the loader read a file it names
_TIMM_FILE_KWARGS = ("checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _timm(name: str, kwargs: dict[str, Any], weights: bool) -> nn.Module:
    """``timm.create_model(name, pretrained=..., **kwargs)``; ``pretrained`` (default false) only
    counts with ``weights`` (a run's own model; a manifest is rebuilt without)."""
    from compress_cli.errors import did_you_mean

    try:
        import timm
    except ImportError:
        raise SourceError(
            f"model.source timm:{name}: needs the timm package: pip install compress-cli[timm]"
        ) from None
    if name == "create_model":  # timm:create_model with kwargs.model_name, as written before timm:NAME
        name = kwargs.pop("model_name", None)
        if not isinstance(name, str):
            raise SourceError(
                "model.source timm:create_model: needs model.kwargs.model_name (or write timm:NAME)"
            )
    files = sorted(set(kwargs) & set(_TIMM_FILE_KWARGS))
    if files:
        raise SourceError(
            f"model.kwargs.{files[0]}: timm would read weights or settings from a file; give the weights "
            "as model.checkpoint (a state_dict, read without running code)"
        )
    pretrained = kwargs.pop("pretrained", False)
    if not isinstance(pretrained, bool):
        raise SourceError(f"model.kwargs.pretrained: must be true or false (got {pretrained!r})")
    if not timm.is_model(name):
        known = timm.list_models()
        raise SourceError(f"model.source timm:{name}: unknown timm model{did_you_mean(name, known)}")
    try:
        return timm.create_model(name, pretrained=pretrained and weights, **kwargs)
    except TypeError as e:
        raise SourceError(f"model.source timm:{name}: bad model.kwargs: {e}") from None
    except (RuntimeError, OSError, ValueError) as e:  # no weights for it, hub unreachable, bad sizes
        first = (str(e).splitlines() or [type(e).__name__])[0]
        if pretrained and weights:
            raise SourceError(
                f"model.source timm:{name}: cannot load its pretrained weights ({first}); "
                "set model.kwargs.pretrained: false, or give model.checkpoint"
            ) from None
        raise SourceError(
            f"model.source timm:{name}: cannot build it ({first}); check model.kwargs"
        ) from None


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
                f"model.checkpoint {p}: not a plain state_dict "
                f"(it contains pickled objects: {_pickle_reason(e)}); "
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


def load_model(cfg: ModelConfig) -> tuple[nn.Module, dict[str, Any]]:
    """The model named by the recipe, with the weights its source ships (``timm:`` pretrained,
    ``hf:``) and its checkpoint loaded. Returns (model, base spec).

    The base spec is what the compressed checkpoint's manifest will rebuild from (for ``hf:`` it
    carries the model's config, ``kwargs.hf_config``: see ``sources.hf``).
    """
    from compress_cli.checkpoint import is_model_dir, load_state_dict_checked, read_manifest

    spec: dict[str, Any] = {"source": cfg.source, "kwargs": dict(cfg.kwargs)}
    if is_model_dir(cfg.source):
        return load_model_dir(cfg.source, trust_source=cfg.trust_source), read_manifest(cfg.source)["model"]
    if cfg.checkpoint and is_model_dir(cfg.checkpoint):
        manifest = read_manifest(cfg.checkpoint)
        if manifest["model"]["source"] != cfg.source:
            raise SourceError(
                f"model.checkpoint {cfg.checkpoint}: was made from {manifest['model']['source']!r}, "
                f"not from model.source {cfg.source!r}"
            )
        # the source is the recipe's own: code the user runs anyway
        own = cfg.trust_source or frozenset({cfg.source})
        return load_model_dir(cfg.checkpoint, trust_source=own), manifest["model"]
    model = build_from_source(spec, weights=True)
    if parse_model_source(cfg.source).kind == "hf":
        from compress_cli.sources.hf import model_spec_kwargs

        spec["kwargs"] = model_spec_kwargs(model, spec["kwargs"])
    if cfg.checkpoint:
        sd = read_state_dict(cfg.checkpoint, cfg.allow_pickle)
        from torch import nn

        if isinstance(sd, nn.Module):
            return sd, spec
        load_state_dict_checked(model, sd, f"model.checkpoint {cfg.checkpoint}")
    return model, spec


def trusted_sources(recipe: Recipe) -> bool | frozenset[str]:
    """What a run of ``recipe`` may rebuild its own snapshots from (``load_model_dir``'s
    ``trust_source``): any source when one of its model configs opts in, else the sources they
    name themselves (the user's own code). A snapshot is a model directory in the output folder,
    which another job or a shared cache may have written: it gets no more trust than the recipe."""
    from pydantic import BaseModel

    from compress_cli.config.recipe import ModelConfig

    found: list[ModelConfig] = []

    def walk(node: Any) -> None:
        if isinstance(node, ModelConfig):
            found.append(node)
        elif isinstance(node, BaseModel):
            for value in vars(node).values():
                walk(value)
        elif isinstance(node, (list, tuple, dict)):
            for value in node.values() if isinstance(node, dict) else node:
                walk(value)

    walk(recipe)
    return any(c.trust_source for c in found) or frozenset(c.source for c in found)


def _pickle_reason(e: Exception) -> str:
    for line in str(e).splitlines():
        if "global" in line.lower():
            return line.strip().rstrip(".")
    return "objects other than tensors"
