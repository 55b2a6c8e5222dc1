"""The compressed model format: ``DIR/manifest.json`` + ``DIR/weights.safetensors.xz`` (or ``.zst``).

Reload needs no pickles and no training code, only the model source named in the manifest:

1. build the base module from ``manifest["model"]``: the caller's ``build`` does it (this package
   is the format only; ``compress_cli.sources.models`` resolves model sources and decides which
   ones a model directory may name);
2. replay the architecture diff (``architecture.py``);
3. decode and load the weights (``codec.py``);
4. run the registered load transforms that the manifest lists (``transforms.py``).

The package imports no torch at import time (stage modules register their transforms here while
``compress --help`` runs); ``codec.py`` does, and is imported by the functions that need it.
Files are written to a temporary name and renamed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress_cli._utils.io import atomic_write_bytes, atomic_write_text
from compress_cli.checkpoint.architecture import (
    apply_architecture_diff,
    architecture_diff,
    register_module_spec,
)
from compress_cli.checkpoint.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    WEIGHTS,
    WEIGHTS_ZSTD,
    checkpoint_size,
    is_model_dir,
    manifest_text,
    read_manifest,
)
from compress_cli.checkpoint.transforms import (
    load_transform,
    register_restore,
    register_transform,
    restore_transforms,
)
from compress_cli.errors import SourceError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "WEIGHTS",
    "WEIGHTS_ZSTD",
    "apply_architecture_diff",
    "architecture_diff",
    "checkpoint_size",
    "copy_model",
    "export_state_dict",
    "is_model_dir",
    "load",
    "load_parts",
    "load_state_dict_checked",
    "manifest_text",
    "read_manifest",
    "register_module_spec",
    "register_restore",
    "register_transform",
    "restore_transforms",
    "save_model",
    "tensor_encodings",
]


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also works on modules with torch.nn.utils.prune masks after a forward
    pass (their recomputed ``weight`` is a non-leaf tensor, which deepcopy refuses), and on modules
    caching computed tensors in a dict attribute (the copy gets them detached)."""
    import copy

    import torch

    swapped: list[tuple[nn.Module, str, Any]] = []
    for m in model.modules():
        for k, v in list(vars(m).items()):
            if isinstance(v, torch.Tensor) and v.grad_fn is not None:
                swapped.append((m, k, v))
                setattr(m, k, v.detach())
            elif isinstance(v, dict) and any(
                isinstance(t, torch.Tensor) and t.grad_fn is not None for t in v.values()
            ):  # a cache of computed tensors (timm LeViT's attention_bias_cache)
                swapped.append((m, k, v))
                setattr(m, k, {n: t.detach() if isinstance(t, torch.Tensor) else t for n, t in v.items()})
    try:
        return copy.deepcopy(model)
    finally:
        for m, k, v in swapped:
            setattr(m, k, v)


def export_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors as the plain architecture names them: torch.nn.utils.prune's
    ``X_orig`` * ``X_mask`` pairs are folded into ``X`` (masked entries are +0.0, where the
    product would give -0.0 for negative weights); everything is detached on the CPU."""
    import torch

    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.endswith("_mask") and k[: -len("_mask")] + "_orig" in sd:
            continue
        if k.endswith("_orig") and k[: -len("_orig")] + "_mask" in sd:
            base = k[: -len("_orig")]
            keep = sd[base + "_mask"] != 0
            out[base] = torch.where(keep, v, torch.zeros((), dtype=v.dtype, device=v.device)).detach().cpu()
        else:
            out[k] = v.detach().cpu()
    return out


def save_model(
    model: nn.Module,
    directory: Path | str,
    *,
    base: nn.Module,
    model_spec: dict[str, Any],
    input_shape: list[int] | tuple[int, ...],
    num_classes: int | None = None,
    edits: list[dict[str, Any]] | None = None,
    transforms: list[dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    input_spec: dict[str, Any] | None = None,
) -> int:
    """Write DIR/manifest.json and the weights; returns the total bytes on disk.

    ``base`` is the module ``model_spec`` builds (random init): the manifest records how ``model``
    differs from it, and ``load`` rebuilds ``model`` from the same spec. ``input_shape``: one
    sample's shape for a single-tensor input, empty for structured inputs, which ``input_spec``
    (:meth:`compress_cli.runtime.inputs.InputSpec.to_json`) describes: names, dtypes, shapes.
    """
    from compress_cli.checkpoint.codec import encode_state_dict, is_zstd

    directory = Path(directory)
    diff = architecture_diff(base, model, source=model_spec.get("source"))
    sd = state_dict if state_dict is not None else export_state_dict(model)
    blob, _ = encode_state_dict(sd)
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": model_spec,
        "input_shape": list(input_shape),
        **({"input_spec": input_spec} if input_spec is not None else {}),
        "num_classes": num_classes,
        "architecture": diff,
        "transforms": transforms or [],
        "edits": edits or [],
        "weights": WEIGHTS_ZSTD if is_zstd(blob) else WEIGHTS,
        **(extra or {}),
    }
    atomic_write_bytes(directory / manifest["weights"], blob)
    for stale in {WEIGHTS, WEIGHTS_ZSTD} - {manifest["weights"]}:  # a re-save with the other codec
        (directory / stale).unlink(missing_ok=True)
    atomic_write_text(directory / MANIFEST, manifest_text(manifest))
    return checkpoint_size(directory)


def _read_weights(d: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    from compress_cli.checkpoint.codec import TooLarge, decode_state_dict

    name = manifest.get("weights", WEIGHTS)
    if name not in (WEIGHTS, WEIGHTS_ZSTD):
        raise SourceError(f"{d / MANIFEST}: unknown weights file {name!r}")
    try:
        return decode_state_dict((d / name).read_bytes())
    except FileNotFoundError:
        raise SourceError(f"{d}: weights file {name} missing") from None
    except TooLarge as e:
        raise SourceError(f"{d / name}: {e}") from None
    except Exception as e:  # lzma/zstd/safetensors/json errors on a damaged file
        raise SourceError(f"{d / name}: corrupt or truncated weights ({type(e).__name__}: {e})") from None


def load_parts(directory: Path | str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(manifest, decoded weights) of a model directory, without building any module."""
    d = Path(directory)
    manifest = read_manifest(d)
    return manifest, _read_weights(d, manifest)


def tensor_encodings(directory: Path | str) -> dict[str, str]:
    """How each tensor of a model directory is stored (e.g. ``gaps+palette``), from the weights file."""
    from compress_cli.checkpoint.codec import encoding_index

    d = Path(directory)
    name = read_manifest(d).get("weights", WEIGHTS)
    return {k: v["enc"] for k, v in encoding_index((d / name).read_bytes()).items()}


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


def load(
    directory: Path | str, build: Callable[[dict[str, Any]], nn.Module], *, apply_transforms: bool = True
) -> nn.Module:
    """Rebuild a compressed model directory written by this tool (eval mode).

    ``build(manifest["model"])`` returns the base module the directory was saved against; it runs
    before the weights are read, so it can refuse a source cheaply. With
    ``apply_transforms=False``: the stored module, before load transforms (e.g. quantization).
    """
    d = Path(directory)
    manifest = read_manifest(d)
    model = build(manifest["model"])
    sd = _read_weights(d, manifest)
    try:
        model = apply_architecture_diff(
            model, manifest.get("architecture", []), stored=sd, source=manifest["model"]["source"]
        )
    except SourceError as e:
        raise SourceError([f"{d / MANIFEST}: {p}" for p in e.problems]) from None
    load_state_dict_checked(model, sd, str(directory))
    for t in manifest.get("transforms", []) if apply_transforms else []:
        fn = load_transform(t["type"])
        if fn is None:
            raise SourceError(
                f"{directory}: manifest needs load transform {t['type']!r}, unknown to this version"
            )
        model = fn(model, t, sd)
    return model.eval()
