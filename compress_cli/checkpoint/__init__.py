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
tensor or per row; int8 codes + one float32 scale per row when every row is an exact int8
multiple of its scale (per-channel quantized weights); sparse + palette. The whole safetensors
payload is then lzma-compressed. Decoding is bit-exact. Files are written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import lzma
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress_cli._utils.io import atomic_write_bytes, atomic_write_text
from compress_cli.errors import SourceError

if TYPE_CHECKING:
    import torch
    from torch import nn

FORMAT = "compress-model"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors.xz"
WEIGHTS_ZSTD = "weights.safetensors.zst"


# --------------------------------------------------------------------------- module specs
# Constructor arguments read back from standard layers, so a changed layer can be rebuilt.
_CTOR_ARGS: dict[str, tuple[str, ...]] = {
    "Conv1d": (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
    ),
    "Conv2d": (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
    ),
    "Conv3d": (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
    ),
    "ConvTranspose2d": (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "output_padding",
        "groups",
        "dilation",
        "padding_mode",
    ),
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
            raise SourceError(
                f"manifest resizes tensor {k!r} of a {type(m).__name__}, which it does not have"
            )


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
    args = {
        k: tuple(v) if isinstance(v, list) and k != "normalized_shape" else v for k, v in spec["args"].items()
    }
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
        if (
            name
            and name not in cur_names
            and (not parent or parent in cur_names)
            and not any(name.startswith(p + ".") for p in replaced)
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
                raise SourceError(
                    f"manifest edits module {path!r}, which the model source does not have"
                ) from None
            _apply_patch(target, item["args"])
            continue
        parent_name, _, child = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError:
            raise SourceError(
                f"manifest edits module {path!r}, which the model source does not have"
            ) from None
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


_RESTORERS: dict[str, Callable[[Any, dict[str, Any]], None]] = {}


def register_restore(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """``fn(state, entry)`` for a load transform: when the pipeline restores a snapshot (``--resume``,
    a guard's revert) it puts the *stored* module in ``state.model`` (``load(apply_transforms=False)``)
    and calls this for each transform entry, to bring back what the stage left (e.g. ``state.runner``)."""

    def deco(fn: Callable[..., None]) -> Callable[..., None]:
        _RESTORERS[name] = fn
        return fn

    return deco


def restore_transforms(state: Any) -> None:
    """Replay ``state.transforms`` on a state whose model came from ``load(apply_transforms=False)``."""
    for t in state.transforms:
        if t["type"] not in _RESTORERS:
            _import_transform_provider(t["type"])
        fn = _RESTORERS.get(t["type"])
        if fn is None:
            raise SourceError(
                f"snapshot needs transform {t['type']!r}, which cannot be restored by this version"
            )
        fn(state, t)


# --------------------------------------------------------------------------- tensor encoding
# A tensor is stored as a position part (how the zeros are skipped) and a value part (how the
# remaining values are written); ``meta["enc"]`` names them joined by "+" ("raw" for neither):
#   positions: sparse = bitmask of the nonzeros; gaps = the run of zeros before each nonzero as
#              bytes (255 = "255 more, continue"), used below ~20% density, where lzma codes a gap
#              byte in fewer bits than the 1/density mask bits it replaces
#   width:     bf16 / f16 = float32 values that are all exactly bfloat16 / float16 values are
#              stored in 2 bytes (e.g. a stage rounded them) and widened back on load
#   values:    (none) = the values as they are; shuffle = their bytes split into planes (all
#              first bytes, then all second bytes, ...: exponents line up, lzma finds them);
#              palette = distinct values + indices packed at their real bit width (or one per
#              byte when skewed: lzma then codes them close to their entropy);
#              rowpalette = one palette per row (per-channel int8 grids);
#              rowgrid = int8 codes + one float32 scale per row, for rows that are exact int8
#              multiples of their scale (per-channel quantized weights: 1 byte per value)
# Everything works on the values' bit patterns, so decoding is bit-exact (-0.0 and NaN payloads
# included). The choice is by estimated size before lzma; lzma then entropy-codes the payload.
_BITS_VIEW = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}


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

    if values.size > 8 * max_codes and len(np.unique(values[: 8 * max_codes])) > max_codes:
        return None  # a prefix already has too many distinct values (dense fp32: skip the full sort)
    uniq, inv = np.unique(values, return_inverse=True)
    if len(uniq) > max_codes:
        return None
    return uniq, inv.astype(np.uint8).reshape(-1)


def _bits_for(count: int) -> int:
    return max(1, math.ceil(math.log2(max(count, 2))))


def encode_gaps(mask: Any) -> Any:
    """Zero-run lengths before each True of a flat bool mask, as bytes (255 = add 255, go on)."""
    import numpy as np

    pos = np.flatnonzero(mask)
    gaps = np.diff(pos, prepend=-1) - 1
    extra = gaps // 255
    out = np.full(int(extra.sum()) + len(gaps), 255, dtype=np.uint8)
    ends = np.cumsum(extra + 1) - 1
    out[ends] = (gaps % 255).astype(np.uint8)
    return out


def decode_gaps(stream: Any, n: int) -> Any:
    import numpy as np

    s = stream.astype(np.int64)
    term = s < 255
    group = np.cumsum(term) - term  # index of the gap each byte belongs to
    gaps = np.bincount(group, weights=s, minlength=int(term.sum()))[: int(term.sum())].astype(np.int64)
    pos = np.cumsum(gaps + 1) - 1
    mask = np.zeros(n, dtype=bool)
    mask[pos] = True
    return mask


def _index_stream(idx: Any, bits: int) -> dict[str, Any]:
    """Palette indices packed at ``bits`` bits ("idx"), or one per byte ("idx8") when their
    distribution is skewed enough that lzma's adaptive byte coding beats the fixed width (it
    gets within a few percent of the entropy on bytes, but cannot model bit-packed symbols)."""
    import numpy as np

    counts = np.bincount(idx, minlength=2)
    p = counts[counts > 0] / idx.size
    entropy = float(-(p * np.log2(p)).sum())
    if bits == 8 or entropy * 1.1 < bits:
        return {"idx8": idx.astype(np.uint8)}
    return {"idx": _pack_bits(idx, bits)}


def _indices(parts: dict[str, Any], bits: int, n: int) -> Any:
    import numpy as np

    if "idx8" in parts:
        return _as_bits(parts["idx8"]).astype(np.int64)
    return _unpack_bits(_as_bits(parts["idx"]), bits, n)


def _narrow(vals: Any) -> tuple[str, Any] | None:
    """float32 bit patterns that are all exactly bfloat16 / float16 values -> (token, 16-bit patterns)."""
    import numpy as np

    if vals.dtype != np.uint32 or vals.size == 0:
        return None
    if not np.any(vals & 0xFFFF):
        return "bf16", (vals >> 16).astype(np.uint16)
    with np.errstate(over="ignore", invalid="ignore"):
        half = vals.view(np.float32).astype(np.float16)
        if np.array_equal(half.astype(np.float32).view(np.uint32), vals):
            return "f16", half.view(np.uint16)
    return None


def _widen(token: str, vals: Any) -> Any:
    import numpy as np

    if token == "bf16":
        return vals.astype(np.uint32) << 16
    return vals.view(np.float16).astype(np.float32).view(np.uint32)


def _encode_values(
    vals: Any, rows: int | None, allow_rows: bool
) -> tuple[list[str], dict[str, Any], dict[str, Any], int]:
    """Best of (as is | shuffle) / palette / rowpalette for a flat bit-pattern array, after
    narrowing float32 values that are exactly 16-bit floats. -> (tokens, meta, parts, est. bytes)."""
    import numpy as np

    narrow = _narrow(vals)
    if narrow is not None:
        enc, meta, parts, size = _encode_values(narrow[1], rows, allow_rows)
        return [narrow[0], *enc], meta, parts, size
    item = vals.dtype.itemsize
    n = vals.size
    best: tuple[list[str], dict[str, Any], dict[str, Any], int] = ([], {}, {"values": vals}, n * item)
    if n >= 16:
        pal = _palette(vals)
        if pal is not None:
            uniq, idx = pal
            bits = _bits_for(len(uniq))
            size = len(uniq) * item + math.ceil(n * bits / 8)
            if size < best[3]:
                best = (["palette"], {"bits": bits}, {"palette": uniq, **_index_stream(idx, bits)}, size)
        if allow_rows and rows and rows > 1 and n // rows >= 256 and best[0] != ["palette"]:
            table_rows = []
            for r in vals.reshape(rows, -1):
                table_rows.append(_palette(r))
                if table_rows[-1] is None:
                    break
            if all(p is not None for p in table_rows):
                width = max(len(p[0]) for p in table_rows)  # type: ignore[index]
                bits = _bits_for(width)
                size = rows * width * item + math.ceil(n * bits / 8)
                if size < best[3]:
                    table = np.zeros((rows, width), dtype=vals.dtype)
                    for i, p in enumerate(table_rows):
                        table[i, : len(p[0])] = p[0]  # type: ignore[index]
                    idx = np.concatenate([p[1] for p in table_rows])  # type: ignore[index]
                    best = (
                        ["rowpalette"],
                        {"bits": bits},
                        {"palette": table, **_index_stream(idx, bits)},
                        size,
                    )
        if allow_rows and rows and rows > 1 and item == 4 and best[0] != ["palette"]:
            grid = _rowgrid(vals.view(np.float32).reshape(rows, -1))
            if grid is not None and n + 4 * rows < best[3]:
                best = (["rowgrid"], {}, {"q": grid[0], "scale": grid[1]}, n + 4 * rows)
        if not best[0] and item > 1:
            planes = np.ascontiguousarray(vals.view(np.uint8).reshape(n, item).T)
            best = (["shuffle"], {}, {"planes": planes}, n * item)
    return best


_FLOAT_OF_WIDTH = {"bf16": "bfloat16", "f16": "float16"}


def _as_float_tensor(bits: Any, dtype: torch.dtype) -> torch.Tensor:
    """Bit patterns -> a tensor of ``dtype`` (how palettes and plain values are stored)."""
    import numpy as np
    import torch

    signed = bits.dtype.str.replace("u", "i")
    return torch.from_numpy(np.ascontiguousarray(bits).view(signed)).view(dtype)


def _rowgrid(rows: Any) -> tuple[Any, Any] | None:
    """Rows that are each an int8 multiple of one float32 scale (per-channel quantized weights):
    -> (int8 codes, float32 scale per row) with ``codes * scale == rows`` bit for bit, else None."""
    import numpy as np

    if rows.dtype != np.float32 or rows.shape[1] < 2 or not np.isfinite(rows).all():
        return None
    if len(rows) > 1 and _rowgrid(rows[:1]) is None:  # every row must pass: try one first
        return None
    absr = np.abs(rows)
    amax = absr.max(axis=1)
    amin = np.where(absr > 0, absr, np.float32(np.inf)).min(axis=1)  # smallest nonzero |value|
    scale = np.zeros(len(rows), np.float32)
    done = amax == 0
    bits = rows.view(np.uint32)
    # candidate scales: the largest |value| is qmax * scale for symmetric ranges; else the smallest
    # nonzero |value| is usually 1 * scale (e.g. QAT scales whose range exceeds the weights)
    candidates = [(amax, q) for q in (127, 128, 63, 64)] + [(amin, 1), (amin, 2)]
    for ref, qmax in candidates:
        with np.errstate(invalid="ignore"):
            base = (ref / np.float32(qmax)).astype(np.float32)
        for ulps in (0, 1, -1, 2, -2):
            todo = np.flatnonzero(~done)
            if todo.size == 0:
                break
            s = base[todo]
            for _ in range(abs(ulps)):
                s = np.nextafter(s, np.float32(np.inf if ulps > 0 else -np.inf)).astype(np.float32)
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                q = np.rint(rows[todo] / s[:, None])
            ok = (s > 0) & np.isfinite(s) & np.isfinite(q).all(axis=1) & (np.abs(q) <= 128).all(axis=1)
            q = np.where(ok[:, None], q, 0).astype(np.int16).astype(np.float32)  # int: no -0.0 codes
            ok &= ((q * s[:, None]).view(np.uint32) == bits[todo]).all(axis=1)
            scale[todo[ok]] = s[ok]
            done[todo[ok]] = True
    if not done.all():
        return None
    codes = np.rint(rows / np.where(scale == 0, np.float32(1), scale)[:, None])
    if codes.min() < -128 or codes.max() > 127:
        return None
    return codes.astype(np.int8), scale


def encode_tensor(name: str, t: torch.Tensor) -> tuple[dict[str, Any], dict[str, Any]]:
    """-> (metadata, {suffix: numpy array or tensor}) with the smallest exact encoding found."""
    import numpy as np
    import torch

    t = t.detach().cpu().contiguous()
    meta: dict[str, Any] = {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
    item = t.element_size()
    if not t.is_floating_point() or t.numel() < 16 or item not in _BITS_VIEW:
        return {**meta, "enc": "raw"}, {"": t}
    view = getattr(torch, _BITS_VIEW[item].replace("uint", "int"))
    arr = t.view(view).numpy().view(_BITS_VIEW[item]).reshape(-1)  # bit patterns
    n = arr.size
    rows = t.shape[0] if t.dim() >= 2 else None
    enc, vmeta, parts, size = _encode_values(arr, rows, allow_rows=True)
    negzero = arr == np.array(1 << (8 * item - 1), dtype=arr.dtype)
    nz = (arr != 0) & ~negzero
    nnz = int(nz.sum())
    if nnz <= n - n // 4:
        gaps = encode_gaps(nz)
        pos_kind, pos_part, pos_size = (
            ("gaps", gaps, gaps.size) if gaps.size < n / 5 else ("sparse", np.packbits(nz), math.ceil(n / 8))
        )
        s_enc, s_meta, s_parts, s_size = _encode_values(arr[nz], None, allow_rows=False)
        n_neg = int(negzero.sum())
        if n_neg:  # -0.0 among the zeros: their positions too, so decoding stays bit-exact
            s_parts["negzero"] = encode_gaps(negzero)
            s_size += s_parts["negzero"].size
            s_meta["negzero"] = n_neg
        if pos_size + s_size < size:
            enc, vmeta, size = [pos_kind, *s_enc], {"nnz": nnz, **s_meta}, pos_size + s_size
            parts = {"mask" if pos_kind == "sparse" else "gaps": pos_part, **s_parts}
    if not enc:
        return {**meta, "enc": "raw"}, {"": t}
    narrowed = next((getattr(torch, _FLOAT_OF_WIDTH[e]) for e in enc if e in _FLOAT_OF_WIDTH), None)
    for key in ("values", "palette"):  # stored as floats (of the narrowed width), readable as such
        if key in parts:
            parts[key] = _as_float_tensor(parts[key], narrowed or t.dtype)
    return {**meta, **vmeta, "enc": "+".join(enc)}, parts


def _as_bits(x: Any) -> Any:
    """A stored tensor part -> numpy array of its bit patterns (works for bfloat16 too)."""
    import numpy as np
    import torch

    if isinstance(x, torch.Tensor):
        item = x.element_size()
        if x.is_floating_point():
            x = x.view(getattr(torch, _BITS_VIEW[item].replace("uint", "int")))
        return x.numpy().view(_BITS_VIEW[item]) if item in _BITS_VIEW else x.numpy()
    return np.asarray(x)


def decode_tensor(meta: dict[str, Any], parts: dict[str, Any]) -> torch.Tensor:
    import numpy as np
    import torch

    if meta["enc"] == "raw":
        return parts[""]
    shape = meta["shape"]
    dtype = getattr(torch, meta["dtype"])
    n = int(np.prod(shape)) if shape else 1
    enc = meta["enc"].split("+")
    narrow = next((e for e in enc if e in _FLOAT_OF_WIDTH), None)
    item = 2 if narrow else torch.empty((), dtype=dtype).element_size()
    bview = _BITS_VIEW[item]
    nvals = meta.get("nnz", n)
    if "rowgrid" in enc:
        q, scale = (
            np.asarray(x.numpy() if isinstance(x, torch.Tensor) else x) for x in (parts["q"], parts["scale"])
        )
        values = (
            (q.astype(np.float32).reshape(shape[0], -1) * scale.astype(np.float32)[:, None])
            .reshape(-1)
            .view(bview)
        )
    elif "palette" in enc:
        pal = _as_bits(parts["palette"]).astype(bview, copy=False)
        values = pal[_indices(parts, meta["bits"], nvals)]
    elif "rowpalette" in enc:
        table = _as_bits(parts["palette"]).astype(bview, copy=False)
        idx = _indices(parts, meta["bits"], nvals).reshape(table.shape[0], -1)
        values = np.take_along_axis(table, idx, axis=1).reshape(-1)
    elif "shuffle" in enc:
        values = (
            np.ascontiguousarray(_as_bits(parts["planes"]).reshape(item, nvals).T).view(bview).reshape(-1)
        )
    else:
        values = _as_bits(parts["values"]).reshape(-1)
    if narrow:
        values = _widen(narrow, values)
    if "sparse" in enc or "gaps" in enc:
        mask = (
            decode_gaps(_as_bits(parts["gaps"]), n)
            if "gaps" in enc
            else np.unpackbits(_as_bits(parts["mask"]))[:n].astype(bool)
        )
        full = np.zeros(n, dtype=values.dtype)
        full[mask] = values
        if meta.get("negzero"):
            full[decode_gaps(_as_bits(parts["negzero"]), n)] = 1 << (8 * full.dtype.itemsize - 1)
        values = full
    return _as_float_tensor(values, dtype).reshape(shape)


def encode_state_dict(sd: dict[str, torch.Tensor], compression: str = "auto") -> tuple[bytes, dict[str, Any]]:
    """The encoded tensors as one safetensors payload, entropy-coded: ``lzma`` (xz, the smallest
    files), ``zstd`` (about 100x faster on large, dense payloads, a few % larger), ``none``, or
    ``auto``: lzma up to LZMA_MAX_BYTES of payload, zstd above (xz runs at 1-2 MB/s on fp32
    mantissas: a minute per 100 MB snapshot)."""
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
            tensors[key] = (
                arr if isinstance(arr, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(arr))
            )
    blob = save(tensors, metadata={"index": json.dumps(index, separators=(",", ":"))})
    if compression == "auto":
        compression = "lzma" if len(blob) <= LZMA_MAX_BYTES else "zstd"
    if compression == "lzma":
        blob = lzma.compress(blob, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, filters=LZMA_FILTERS)
    elif compression == "zstd":
        import zstandard

        blob = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).compress(blob)
    return blob, index


LZMA_MAX_BYTES = 4 << 20
ZSTD_LEVEL = 12
XZ_MAGIC, ZSTD_MAGIC = b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd"


def weights_name(blob: bytes) -> str:
    """The weights file's name for an encoded payload (its suffix says how it is compressed)."""
    return WEIGHTS_ZSTD if blob[:4] == ZSTD_MAGIC else WEIGHTS


#: xz with LZMA2 at preset 6 but no literal-context / position bits: the payload is mostly
#: byte-planes, bit-packed indices and gap bytes, whose next byte does not depend on the bits of
#: the previous one (about 2% smaller than the defaults on a pruned + shared CNN). The filter
#: settings are stored in the xz header, so any xz decoder reads the file.
LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6, "lc": 0, "lp": 0, "pb": 0}]


def _decompress(blob: bytes) -> bytes:
    if blob[:6] == XZ_MAGIC:
        return lzma.decompress(blob)
    if blob[:4] == ZSTD_MAGIC:
        import zstandard

        return zstandard.ZstdDecompressor().decompress(blob)
    return blob


def _index(payload: bytes) -> dict[str, Any]:
    """The per-tensor encoding index stored in the safetensors header's metadata."""
    header = json.loads(payload[8 : 8 + int.from_bytes(payload[:8], "little")])
    return json.loads(header["__metadata__"]["index"])


def decode_state_dict(blob: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    blob = _decompress(blob)
    tensors = load(blob)
    index = _index(blob)
    out = {}
    for name, meta in index.items():
        prefix = f"{name}::"
        parts = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if name in tensors:
            parts[""] = tensors[name]
        out[name] = decode_tensor(meta, parts)
    return out


# --------------------------------------------------------------------------- save / load
def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also works on modules with torch.nn.utils.prune masks after a forward
    pass (their recomputed ``weight`` is a non-leaf tensor, which deepcopy refuses)."""
    import copy

    import torch

    swapped = []
    for m in model.modules():
        for k, v in list(vars(m).items()):
            if isinstance(v, torch.Tensor) and v.grad_fn is not None:
                swapped.append((m, k, v))
                setattr(m, k, v.detach())
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
    model_spec: dict[str, Any],
    input_shape: list[int] | tuple[int, ...],
    num_classes: int | None = None,
    edits: list[dict[str, Any]] | None = None,
    transforms: list[dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> int:
    """Write DIR/manifest.json and the weights; returns the total bytes on disk."""
    from compress_cli.sources.models import build_from_source

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
        "weights": weights_name(blob),
        **(extra or {}),
    }
    atomic_write_bytes(directory / manifest["weights"], blob)
    for stale in {WEIGHTS, WEIGHTS_ZSTD} - {manifest["weights"]}:  # a re-save with the other codec
        (directory / stale).unlink(missing_ok=True)
    atomic_write_text(directory / MANIFEST, manifest_text(manifest))
    return checkpoint_size(directory)


def manifest_text(manifest: dict[str, Any]) -> str:
    """One top-level key per line, each value compact: readable, and 50-70 % of ``indent=2``'s size
    (the manifest counts in the checkpoint's size: 446 of the deep-compressed Fashion CNN's 14,806
    bytes, 605 with ``indent=2``)."""
    lines = [
        f"{json.dumps(k)}: {json.dumps(v, separators=(',', ':'), default=str)}" for k, v in manifest.items()
    ]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def checkpoint_size(directory: Path | str) -> int:
    d = Path(directory)
    return sum(p.stat().st_size for p in (d / MANIFEST, d / WEIGHTS, d / WEIGHTS_ZSTD) if p.exists())


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
        raise SourceError(
            f"{d / MANIFEST}: format version {manifest['version']} is newer than this tool supports"
        )
    return manifest


def load_parts(directory: Path | str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    d = Path(directory)
    manifest = read_manifest(d)
    name = manifest.get("weights", WEIGHTS)
    if name not in (WEIGHTS, WEIGHTS_ZSTD):
        raise SourceError(f"{d / MANIFEST}: unknown weights file {name!r}")
    try:
        sd = decode_state_dict((d / name).read_bytes())
    except FileNotFoundError:
        raise SourceError(f"{d}: weights file {name} missing") from None
    except Exception as e:  # lzma/zstd/safetensors/json errors on a damaged file
        raise SourceError(f"{d / name}: corrupt or truncated weights ({type(e).__name__}: {e})") from None
    return manifest, sd


def tensor_encodings(directory: Path | str) -> dict[str, str]:
    """How each tensor of a model directory is stored (e.g. ``gaps+palette``), from the weights file."""
    d = Path(directory)
    name = read_manifest(d).get("weights", WEIGHTS)
    return {k: v["enc"] for k, v in _index(_decompress((d / name).read_bytes())).items()}


def rebuild(manifest: dict[str, Any]) -> nn.Module:
    """The architecture the manifest describes, with the base source's initial weights."""
    from compress_cli.sources.models import build_from_source

    model = build_from_source(manifest["model"])
    return apply_architecture_diff(model, manifest.get("architecture", []))


def load(directory: Path | str, apply_transforms: bool = True) -> nn.Module:
    """Rebuild a compressed model directory written by this tool (eval mode). With
    ``apply_transforms=False``: the stored module, before load transforms (e.g. quantization)."""
    from compress_cli.sources.models import load_state_dict_checked

    manifest, sd = load_parts(directory)
    model = rebuild(manifest)
    load_state_dict_checked(model, sd, str(directory))
    for t in manifest.get("transforms", []) if apply_transforms else []:
        fn = _TRANSFORMS.get(t["type"])
        if fn is None:
            _import_transform_provider(t["type"])
            fn = _TRANSFORMS.get(t["type"])
        if fn is None:
            raise SourceError(
                f"{directory}: manifest needs load transform {t['type']!r}, unknown to this version"
            )
        model = fn(model, t, sd)
    return model.eval()


#: load transform -> the module whose import registers it (and its restorer), imported by name only
#: when a manifest or a snapshot lists that transform: loading never imports the stages
TRANSFORM_PROVIDERS = {"quantize": "compress_cli.quantization.transforms"}


def _import_transform_provider(name: str) -> None:
    """Register transform ``name``: import its module from :data:`TRANSFORM_PROVIDERS`, or for a
    name not in it, the plugins' modules (a third-party transform registers itself on import)."""
    import importlib

    from compress_cli._utils.plugins import load_plugins

    if name in TRANSFORM_PROVIDERS:
        importlib.import_module(TRANSFORM_PROVIDERS[name])
        return
    try:
        load_plugins()
    except ImportError as e:
        raise SourceError(f"load transform {name!r}: {e}") from None
