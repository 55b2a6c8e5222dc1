"""The compressed model format: ``DIR/manifest.json`` + ``DIR/weights.safetensors.xz``.

Reload needs no pickles and no training code, only the model source named in the manifest:

1. build the base module from ``manifest["model"]`` (zoo / torchvision / module:callable);
2. replay the *architecture diff*: every module whose class or constructor arguments differ from
   the freshly built base (channels removed, blocks replaced by Identity, ...) is recorded at save
   time as a spec and rebuilt here — one mechanism for every structural stage, no per-stage code;
3. run the registered load transforms (e.g. quantization) that the manifest lists;
4. decode and load the weights.

Each tensor is stored in the smallest of: dense; bitmask + nonzero values (sparse); a palette of
its distinct values + indices packed at their real bit width (int8 grids, k-means codebooks), per
tensor or per row; sparse + palette. The whole safetensors payload is then lzma-compressed.
Decoding is bit-exact. Files are written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import lzma
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import SourceError

if TYPE_CHECKING:
    import torch
    from torch import nn

FORMAT = "compress-model"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors.xz"


# --------------------------------------------------------------------------- atomic files
def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# --------------------------------------------------------------------------- module specs
# Constructor arguments read back from standard layers, so a changed layer can be rebuilt.
_CTOR_ARGS: dict[str, tuple[str, ...]] = {
    "Conv1d": ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"),
    "Conv2d": ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"),
    "Conv3d": ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"),
    "ConvTranspose2d": ("in_channels", "out_channels", "kernel_size", "stride", "padding", "output_padding", "groups", "dilation", "padding_mode"),
    "Linear": ("in_features", "out_features"),
    "BatchNorm1d": ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    "BatchNorm2d": ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    "BatchNorm3d": ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    "LayerNorm": ("normalized_shape", "eps", "elementwise_affine"),
    "GroupNorm": ("num_groups", "num_channels", "eps", "affine"),
    "Embedding": ("num_embeddings", "embedding_dim", "padding_idx"),
    "Identity": (),
    "PReLU": ("num_parameters",),
    # parameterless layers a structural edit may put into a new container (drop_layers' bypasses)
    "ReLU": ("inplace",),
    "ReLU6": ("inplace",),
    "SiLU": ("inplace",),
    "Hardswish": ("inplace",),
    "Hardsigmoid": ("inplace",),
    "LeakyReLU": ("negative_slope", "inplace"),
    "GELU": ("approximate",),
    "Sigmoid": (),
    "Tanh": (),
    "Dropout": ("p", "inplace"),
    "Flatten": ("start_dim", "end_dim"),
}
_HAS_BIAS = {"Conv1d", "Conv2d", "Conv3d", "ConvTranspose2d", "Linear", "LayerNorm"}

#: extra module kinds: class name -> (describe(module) -> args, build(args) -> module)
_EXTRA_SPECS: dict[str, tuple[Callable[[Any], dict[str, Any]], Callable[[dict[str, Any]], Any]]] = {}


def register_module_spec(
    class_name: str, describe: Callable[[Any], dict[str, Any]], build: Callable[[dict[str, Any]], Any]
) -> None:
    """Teach the architecture diff a module kind beyond the standard torch.nn layers."""
    _EXTRA_SPECS[class_name] = (describe, build)


def module_spec(m: nn.Module) -> dict[str, Any] | None:
    """``{"class": ..., "args": {...}}`` for a rebuildable module, else None."""
    cls = type(m).__name__
    if cls in _EXTRA_SPECS:
        return {"class": cls, "args": _EXTRA_SPECS[cls][0](m)}
    if cls not in _CTOR_ARGS or type(m).__module__.split(".")[0] != "torch":
        return None
    args: dict[str, Any] = {}
    for a in _CTOR_ARGS[cls]:
        v = getattr(m, a)
        args[a] = list(v) if isinstance(v, tuple) else v
    if cls in _HAS_BIAS:
        args["bias"] = getattr(m, "bias", None) is not None
    return {"class": cls, "args": args}


def container_spec(m: nn.Module) -> dict[str, Any] | None:
    """Spec of a plain ``nn.Sequential`` whose every descendant is describable (a new container put
    in place of another module, e.g. a residual block replaced by its shortcut path), else None."""
    from torch import nn

    if type(m) is not nn.Sequential:
        return None
    children = []
    for name, child in m.named_children():
        spec = module_spec(child) or container_spec(child)
        if spec is None:
            return None
        children.append({"name": name, **spec})
    return {"class": "Sequential", "args": {}, "children": children}


def _patchable_attrs(m: nn.Module) -> dict[str, Any]:
    """Plain public attributes of a module (ints, floats, strings, tuples of them)."""
    out: dict[str, Any] = {}
    for k, v in vars(m).items():
        if k.startswith("_") or k == "training":
            continue
        if isinstance(v, (bool, int, float, str, type(None))):
            out[k] = v
        elif isinstance(v, (tuple, list)) and all(isinstance(x, (bool, int, float, str)) for x in v):
            out[k] = list(v)
    return out


def _own_tensor_shapes(m: nn.Module) -> dict[str, list[int]]:
    own = {**m._parameters, **m._buffers}
    return {k: list(v.shape) for k, v in own.items() if v is not None}


def patch_spec(base: nn.Module, current: nn.Module) -> dict[str, Any] | None:
    """For a module of unchanged class that has no constructor spec: the plain attributes and own
    tensor shapes that differ from ``base`` (e.g. a MultiheadAttention whose embed_dim was pruned,
    a block that stores its channel count), or None when nothing differs."""
    a, b = _patchable_attrs(current), _patchable_attrs(base)
    attrs = {k: v for k, v in a.items() if k in b and b[k] != v}
    ts, tb = _own_tensor_shapes(current), _own_tensor_shapes(base)
    tensors = {k: v for k, v in ts.items() if k in tb and tb[k] != v}
    if not attrs and not tensors:
        return None
    return {"class": "__patch__", "args": {"attrs": attrs, "tensors": tensors}}


def _apply_patch(m: nn.Module, args: dict[str, Any]) -> None:
    import torch
    from torch import nn

    for k, v in args.get("attrs", {}).items():
        old = getattr(m, k, None)
        setattr(m, k, tuple(v) if isinstance(old, tuple) and isinstance(v, list) else v)
    for k, shape in args.get("tensors", {}).items():
        p, b = m._parameters.get(k), m._buffers.get(k)
        if p is not None:
            m._parameters[k] = nn.Parameter(torch.zeros(shape, dtype=p.dtype), requires_grad=p.requires_grad)
        elif b is not None:
            m._buffers[k] = torch.zeros(shape, dtype=b.dtype)
        else:
            raise SourceError(f"manifest resizes tensor {k!r} of a {type(m).__name__}, which it does not have")


def build_module(spec: dict[str, Any]) -> nn.Module:
    from torch import nn

    cls = spec["class"]
    if cls == "Sequential" and "children" in spec:
        from collections import OrderedDict

        return nn.Sequential(OrderedDict((c["name"], build_module(c)) for c in spec["children"]))
    if cls in _EXTRA_SPECS:
        return _EXTRA_SPECS[cls][1](spec["args"])
    if cls not in _CTOR_ARGS:
        raise SourceError(f"manifest names module class {cls!r}, which this version cannot rebuild")
    args = {k: tuple(v) if isinstance(v, list) and k != "normalized_shape" else v for k, v in spec["args"].items()}
    if cls == "Conv2d" and isinstance(args.get("padding"), str):
        pass
    return getattr(nn, cls)(**args)


def architecture_diff(base: nn.Module, current: nn.Module) -> list[dict[str, Any]]:
    """Modules of ``current`` that differ from ``base``, outermost first, as rebuild specs.

    A changed module with constructor arguments is rebuilt from them; a new plain ``nn.Sequential``
    is rebuilt from its children's specs; a module of unchanged class without constructor spec whose
    plain attributes or own tensor shapes changed is patched in place (``__patch__``)."""
    base_mods = dict(base.named_modules())
    diff: list[dict[str, Any]] = []
    replaced: list[str] = []
    for name, mod in current.named_modules():
        if any(name.startswith(p + ".") for p in replaced):
            continue
        ref = base_mods.get(name)
        spec = module_spec(mod)
        if ref is not None and type(ref) is type(mod) and spec is None:
            patch = patch_spec(ref, mod)
            if patch is not None:
                diff.append({"path": name, **patch})
            continue
        if not name or (ref is not None and type(ref) is type(mod) and spec == module_spec(ref)):
            continue
        if spec is None:
            spec = container_spec(mod)
        if spec is None:
            raise SourceError(
                f"module {name!r} ({type(mod).__name__}) differs from the model source and cannot be described "
                "in the manifest; register it with compress_cli.checkpoint.register_module_spec"
            )
        diff.append({"path": name, **spec})
        replaced.append(name)
    cur_names = {n for n, _ in current.named_modules()}
    for name in base_mods:
        parent = name.rpartition(".")[0]
        if name and name not in cur_names and (not parent or parent in cur_names) and not any(
            name.startswith(p + ".") for p in replaced
        ):
            diff.append({"path": name, "class": "__deleted__", "args": {}})
    return diff


def apply_architecture_diff(model: nn.Module, diff: list[dict[str, Any]]) -> nn.Module:
    for item in diff:
        path = item["path"]
        if item["class"] == "__patch__":
            try:
                target = model.get_submodule(path) if path else model
            except AttributeError:
                raise SourceError(f"manifest edits module {path!r}, which the model source does not have") from None
            _apply_patch(target, item["args"])
            continue
        parent_name, _, child = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError:
            raise SourceError(f"manifest edits module {path!r}, which the model source does not have") from None
        if item["class"] == "__deleted__":
            delattr(parent, child)
        else:
            setattr(parent, child, build_module(item))
    return model


# --------------------------------------------------------------------------- load transforms
_TRANSFORMS: dict[str, Callable[[nn.Module, dict[str, Any], dict[str, torch.Tensor]], nn.Module]] = {}


def register_transform(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """``fn(model, params, state_dict) -> model``, run by load() after the weights are loaded."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _TRANSFORMS[name] = fn
        return fn

    return deco


# --------------------------------------------------------------------------- tensor encoding
def _pack_bits(idx: Any, bits: int) -> Any:
    import numpy as np

    planes = ((idx[:, None] >> np.arange(bits, dtype=np.uint8)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1))


def _unpack_bits(packed: Any, bits: int, n: int) -> Any:
    import numpy as np

    planes = np.unpackbits(packed)[: n * bits].reshape(n, bits)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(axis=1).astype(np.int64)


def _palette(values: Any, max_codes: int = 256) -> tuple[Any, Any] | None:
    import numpy as np

    uniq, inv = np.unique(values, return_inverse=True)
    if len(uniq) > max_codes:
        return None
    return uniq, inv.astype(np.uint8)


def encode_tensor(name: str, t: torch.Tensor) -> tuple[dict[str, Any], dict[str, Any]]:
    """-> (metadata, {suffix: numpy array}) with the smallest exact encoding found."""
    import numpy as np
    import torch

    t = t.detach().cpu().contiguous()
    meta: dict[str, Any] = {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
    if not t.is_floating_point() or t.numel() < 64 or t.dtype == torch.bfloat16:
        return {**meta, "enc": "raw"}, {"": t}
    arr = t.numpy().reshape(-1)
    parts: dict[str, Any] = {}
    enc = []
    values = arr
    zeros = int((arr == 0).sum())
    if zeros >= arr.size // 4:
        mask = arr != 0
        parts["mask"] = np.packbits(mask)
        values = arr[mask]
        enc.append("sparse")
        meta["nnz"] = int(values.size)
    pal = _palette(values) if values.size >= 32 else None
    if pal is not None:
        uniq, idx = pal
        bits = max(1, math.ceil(math.log2(max(len(uniq), 2))))
        parts["palette"] = uniq
        parts["idx"] = _pack_bits(idx, bits)
        meta["bits"] = bits
        enc.append("palette")
    elif "sparse" not in enc and t.dim() >= 2 and t.shape[0] > 1:
        rows = arr.reshape(t.shape[0], -1)
        if rows.shape[1] >= 256:
            pals = [_palette(r) for r in rows]
            if all(p is not None for p in pals):
                width = max(len(p[0]) for p in pals)  # type: ignore[index]
                bits = max(1, math.ceil(math.log2(max(width, 2))))
                table = np.zeros((rows.shape[0], width), dtype=arr.dtype)
                idx = np.concatenate([p[1] for p in pals])  # type: ignore[index]
                for i, p in enumerate(pals):
                    table[i, : len(p[0])] = p[0]  # type: ignore[index]
                parts["palette"] = table
                parts["idx"] = _pack_bits(idx, bits)
                meta["bits"] = bits
                enc.append("rowpalette")
    if not enc:
        return {**meta, "enc": "raw"}, {"": t}
    if "sparse" in enc and "palette" not in enc:
        parts["values"] = values
    meta["enc"] = "+".join(enc)
    return meta, parts


def decode_tensor(meta: dict[str, Any], parts: dict[str, Any]) -> torch.Tensor:
    import numpy as np
    import torch

    if meta["enc"] == "raw":
        return parts[""]
    shape = meta["shape"]
    n = int(np.prod(shape)) if shape else 1
    enc = meta["enc"].split("+")
    nvals = meta.get("nnz", n)
    if "palette" in enc:
        pal = parts["palette"].numpy()
        values = pal[_unpack_bits(parts["idx"].numpy(), meta["bits"], nvals)]
    elif "rowpalette" in enc:
        table = parts["palette"].numpy()
        idx = _unpack_bits(parts["idx"].numpy(), meta["bits"], nvals).reshape(table.shape[0], -1)
        values = np.take_along_axis(table, idx, axis=1).reshape(-1)
    else:
        values = parts["values"].numpy()
    if "sparse" in enc:
        mask = np.unpackbits(parts["mask"].numpy())[:n].astype(bool)
        full = np.zeros(n, dtype=values.dtype)
        full[mask] = values
        values = full
    return torch.from_numpy(np.ascontiguousarray(values).reshape(shape))


def encode_state_dict(sd: dict[str, torch.Tensor], compression: str = "lzma") -> tuple[bytes, dict[str, Any]]:
    import numpy as np
    import torch
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    index: dict[str, Any] = {}
    for name, t in sd.items():
        meta, parts = encode_tensor(name, t)
        index[name] = meta
        for suffix, arr in parts.items():
            key = f"{name}::{suffix}" if suffix else name
            tensors[key] = arr if isinstance(arr, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(arr))
    blob = save(tensors, metadata={"index": json.dumps(index)})
    if compression == "lzma":
        blob = lzma.compress(blob, preset=6)
    return blob, index


def decode_state_dict(blob: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    if blob[:6] == b"\xfd7zXZ\x00":
        blob = lzma.decompress(blob)
    tensors = load(blob)
    from safetensors import safe_open  # noqa: F401  (metadata read below)

    header_len = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + header_len])
    index = json.loads(header["__metadata__"]["index"])
    out = {}
    for name, meta in index.items():
        prefix = f"{name}::"
        parts = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if name in tensors:
            parts[""] = tensors[name]
        out[name] = decode_tensor(meta, parts)
    return out


# --------------------------------------------------------------------------- save / load
def export_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors as the plain architecture names them: torch.nn.utils.prune's
    ``X_orig`` * ``X_mask`` pairs are folded into ``X``; everything is detached on the CPU."""
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.endswith("_mask") and k[: -len("_mask")] + "_orig" in sd:
            continue
        if k.endswith("_orig") and k[: -len("_orig")] + "_mask" in sd:
            base = k[: -len("_orig")]
            out[base] = (v * sd[base + "_mask"]).detach().cpu()
        else:
            out[k] = v.detach().cpu()
    return out


def save_model(
    model: nn.Module,
    directory: Path | str,
    *,
    model_spec: dict[str, Any],
    input_shape: list[int] | tuple[int, ...],
    num_classes: int | None = None,
    edits: list[dict[str, Any]] | None = None,
    transforms: list[dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> int:
    """Write DIR/manifest.json and the weights; returns the total bytes on disk."""
    from .sources.models import build_from_source

    directory = Path(directory)
    base = build_from_source(model_spec)
    diff = architecture_diff(base, model)
    sd = state_dict if state_dict is not None else export_state_dict(model)
    blob, index = encode_state_dict(sd)
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": model_spec,
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "architecture": diff,
        "transforms": transforms or [],
        "edits": edits or [],
        "encodings": {k: v["enc"] for k, v in index.items()},
        **(extra or {}),
    }
    atomic_write_bytes(directory / WEIGHTS, blob)
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=2, default=str))
    return checkpoint_size(directory)


def checkpoint_size(directory: Path | str) -> int:
    d = Path(directory)
    return sum(p.stat().st_size for p in (d / MANIFEST, d / WEIGHTS) if p.exists())


def is_model_dir(path: Path | str) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(directory: Path | str) -> dict[str, Any]:
    d = Path(directory)
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except FileNotFoundError:
        raise SourceError(f"{d}: not a compressed model directory ({MANIFEST} missing)") from None
    except (OSError, ValueError) as e:
        raise SourceError(f"{d / MANIFEST}: unreadable manifest: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SourceError(f"{d / MANIFEST}: not a {FORMAT} manifest")
    if manifest.get("version", 0) > FORMAT_VERSION:
        raise SourceError(f"{d / MANIFEST}: format version {manifest['version']} is newer than this tool supports")
    return manifest


def load_parts(directory: Path | str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    d = Path(directory)
    manifest = read_manifest(d)
    try:
        sd = decode_state_dict((d / WEIGHTS).read_bytes())
    except FileNotFoundError:
        raise SourceError(f"{d}: weights file {WEIGHTS} missing") from None
    except Exception as e:  # lzma/safetensors/json errors on a damaged file
        raise SourceError(f"{d / WEIGHTS}: corrupt or truncated weights ({type(e).__name__}: {e})") from None
    return manifest, sd


def rebuild(manifest: dict[str, Any]) -> nn.Module:
    """The architecture the manifest describes, with the base source's initial weights."""
    from .sources.models import build_from_source

    model = build_from_source(manifest["model"])
    return apply_architecture_diff(model, manifest.get("architecture", []))


def load(directory: Path | str) -> nn.Module:
    """Rebuild a compressed model directory written by this tool (eval mode)."""
    from .sources.models import load_state_dict_checked

    manifest, sd = load_parts(directory)
    model = rebuild(manifest)
    load_state_dict_checked(model, sd, str(directory))
    for t in manifest.get("transforms", []):
        fn = _TRANSFORMS.get(t["type"])
        if fn is None:
            _import_transform_provider(t["type"])
            fn = _TRANSFORMS.get(t["type"])
        if fn is None:
            raise SourceError(f"{directory}: manifest needs load transform {t['type']!r}, unknown to this version")
        model = fn(model, t, sd)
    return model.eval()


def _import_transform_provider(name: str) -> None:
    from .registry import list_stages

    list_stages()  # stage modules register their transforms on import
