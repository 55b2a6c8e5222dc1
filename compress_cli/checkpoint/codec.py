"""The tensor codec: a state dict <-> one entropy-coded safetensors payload, bit-exact.

Each tensor is stored in the smallest of: dense; bitmask + nonzero values (sparse); a palette of
its distinct values + indices packed at their real bit width (int8 grids, k-means codebooks), per
tensor or per row; int8 codes + one float32 scale per row when every row is an exact int8
multiple of its scale (per-channel quantized weights); sparse + palette. The whole safetensors
payload is then lzma- or zstd-compressed. The encoding of each tensor is in the payload's own
metadata, so the payload decodes without the manifest.
"""

from __future__ import annotations

import json
import lzma
import math
import os
from typing import Any

import numpy as np
import torch
import zstandard
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

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
    planes = ((idx[:, None] >> np.arange(bits, dtype=np.uint8)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1))


def _unpack_bits(packed: Any, bits: int, n: int) -> Any:
    planes = np.unpackbits(packed)[: n * bits].reshape(n, bits)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(axis=1).astype(np.int64)


def _palette(values: Any, max_codes: int = 256) -> tuple[Any, Any] | None:
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

    pos = np.flatnonzero(mask)
    gaps = np.diff(pos, prepend=-1) - 1
    extra = gaps // 255
    out = np.full(int(extra.sum()) + len(gaps), 255, dtype=np.uint8)
    ends = np.cumsum(extra + 1) - 1
    out[ends] = (gaps % 255).astype(np.uint8)
    return out


def decode_gaps(stream: Any, n: int) -> Any:
    """The flat bool mask of ``n`` entries that :func:`encode_gaps` turned into ``stream``."""
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

    counts = np.bincount(idx, minlength=2)
    p = counts[counts > 0] / idx.size
    entropy = float(-(p * np.log2(p)).sum())
    if bits == 8 or entropy * 1.1 < bits:
        return {"idx8": idx.astype(np.uint8)}
    return {"idx": _pack_bits(idx, bits)}


def _indices(parts: dict[str, Any], bits: int, n: int) -> Any:
    if "idx8" in parts:
        return _as_bits(parts["idx8"]).astype(np.int64)
    return _unpack_bits(_as_bits(parts["idx"]), bits, n)


def _narrow(vals: Any) -> tuple[str, Any] | None:
    """float32 bit patterns that are all exactly bfloat16 / float16 values -> (token, 16-bit patterns)."""

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
    if token == "bf16":
        return vals.astype(np.uint32) << 16
    return vals.view(np.float16).astype(np.float32).view(np.uint32)


def _encode_values(
    vals: Any, rows: int | None, allow_rows: bool
) -> tuple[list[str], dict[str, Any], dict[str, Any], int]:
    """Best of (as is | shuffle) / palette / rowpalette for a flat bit-pattern array, after
    narrowing float32 values that are exactly 16-bit floats. -> (tokens, meta, parts, est. bytes)."""

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
#: the dtypes an encoded (not raw) tensor can have, by the name the index stores
_FLOAT_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in vars(torch).values()
    if isinstance(d, torch.dtype) and d.is_floating_point
}


def _as_float_tensor(bits: Any, dtype: torch.dtype) -> torch.Tensor:
    """Bit patterns -> a tensor of ``dtype`` (how palettes and plain values are stored)."""

    signed = bits.dtype.str.replace("u", "i")
    return torch.from_numpy(np.ascontiguousarray(bits).view(signed)).view(dtype)


def _rowgrid(rows: Any) -> tuple[Any, Any] | None:
    """Rows that are each an int8 multiple of one float32 scale (per-channel quantized weights):
    -> (int8 codes, float32 scale per row) with ``codes * scale == rows`` bit for bit, else None."""

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

    if isinstance(x, torch.Tensor):
        item = x.element_size()
        if x.is_floating_point():
            x = x.view(getattr(torch, _BITS_VIEW[item].replace("uint", "int")))
        return x.numpy().view(_BITS_VIEW[item]) if item in _BITS_VIEW else x.numpy()
    return np.asarray(x)


def decode_tensor(meta: dict[str, Any], parts: dict[str, Any]) -> torch.Tensor:
    """The tensor that :func:`encode_tensor` wrote as (metadata, parts), bit-exact. The metadata comes
    from the file: an encoded tensor whose dtype is not floating point is a ValueError."""
    if meta["enc"] == "raw":
        return parts[""]
    shape = meta["shape"]
    dtype = _FLOAT_DTYPES.get(meta["dtype"])
    if dtype is None:  # the index is read from the file: look names up, never getattr on them
        raise ValueError(f"tensor encoded as {meta['dtype']!r}, not a floating-point dtype")
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


#: payloads up to this size are xz-compressed, larger ones zstd (see encode_state_dict)
LZMA_MAX_BYTES = 4 << 20
ZSTD_LEVEL = 12
XZ_MAGIC, ZSTD_MAGIC = b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd"

#: xz with LZMA2 at preset 6 but no literal-context / position bits: the payload is mostly
#: byte-planes, bit-packed indices and gap bytes, whose next byte does not depend on the bits of
#: the previous one (about 2% smaller than the defaults on a pruned + shared CNN). The filter
#: settings are stored in the xz header, so any xz decoder reads the file.
LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6, "lc": 0, "lp": 0, "pb": 0}]


def encode_state_dict(sd: dict[str, torch.Tensor], compression: str = "auto") -> tuple[bytes, dict[str, Any]]:
    """The encoded tensors as one safetensors payload, entropy-coded: ``lzma`` (xz, the smallest
    files), ``zstd`` (about 100x faster on large, dense payloads, a few % larger), ``none``, or
    ``auto``: lzma up to LZMA_MAX_BYTES of payload, zstd above (xz runs at 1-2 MB/s on fp32
    mantissas: a minute per 100 MB snapshot). -> (payload, per-tensor encoding index)."""
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
    blob = save_safetensors(tensors, metadata={"index": json.dumps(index, separators=(",", ":"))})
    if compression == "auto":
        compression = "lzma" if len(blob) <= LZMA_MAX_BYTES else "zstd"
    if compression == "lzma":
        blob = lzma.compress(blob, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, filters=LZMA_FILTERS)
    elif compression == "zstd":
        blob = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).compress(blob)
    return blob, index


def is_zstd(blob: bytes) -> bool:
    """Whether an encoded payload is zstd-compressed (else xz, or uncompressed)."""
    return blob[:4] == ZSTD_MAGIC


class TooLarge(ValueError):
    """A weights file that declares more memory than the machine has (a damaged or hostile file,
    e.g. a few kilobytes that decompress to terabytes, or a model too large for this machine)."""


#: a weights file may claim at most this fraction of the memory available when it is read
MEMORY_FRACTION = 0.8


def memory_available() -> int:
    """Bytes of memory available now (``MemAvailable`` on Linux, free pages elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _within_memory(nbytes: int, what: str, more_than: bool = False) -> None:
    avail = memory_available()
    if more_than or nbytes > MEMORY_FRACTION * avail:
        claim = f"decompress to more than {_size(nbytes)}" if more_than else f"declare {_size(nbytes)}"
        raise TooLarge(
            f"{what} {claim}, more than {MEMORY_FRACTION:.0%} of the {_size(avail)} of memory "
            "available: refused before allocating (a damaged or hostile file, or a model too large "
            "for this machine)"
        )


def _memory_limit() -> int:
    return int(MEMORY_FRACTION * memory_available())


def _decompress(blob: bytes) -> bytes:
    """The safetensors payload of an encoded blob, decompressed no further than the memory available
    allows (a decompression bomb is refused, not run into the OOM killer)."""
    if blob[:6] == XZ_MAGIC:
        d = lzma.LZMADecompressor()
        limit = _memory_limit()
        out = d.decompress(blob, max_length=limit)
        if not d.eof and len(out) >= limit:
            _within_memory(len(out), "the weights", more_than=True)
        if not d.eof:
            raise EOFError("the xz stream ends early")
        return out
    if is_zstd(blob):
        size = zstandard.frame_content_size(blob)
        if size >= 0:  # what the writers here make: the frame says its size
            _within_memory(size, "the weights")
            return zstandard.ZstdDecompressor().decompress(blob)
        limit = _memory_limit()
        with zstandard.ZstdDecompressor().stream_reader(blob) as r:
            out = r.read(limit + 1)
        if len(out) > limit:
            _within_memory(len(out), "the weights", more_than=True)
        return out
    return blob


def _decoded_bytes(index: dict[str, Any]) -> int:
    """Bytes the tensors of an encoding index take once decoded (their shapes are read from the file)."""
    total = 0
    for meta in index.values():
        if meta.get("enc") == "raw":
            continue  # raw tensors are the payload itself, already counted
        dtype = _FLOAT_DTYPES.get(meta.get("dtype", ""))
        item = torch.empty((), dtype=dtype).element_size() if dtype is not None else 8
        total += math.prod(int(d) for d in meta.get("shape", [])) * item
    return total


def _index(payload: bytes) -> dict[str, Any]:
    """The per-tensor encoding index stored in the safetensors header's metadata."""
    header = json.loads(payload[8 : 8 + int.from_bytes(payload[:8], "little")])
    return json.loads(header["__metadata__"]["index"])


def encoding_index(blob: bytes) -> dict[str, Any]:
    """The per-tensor encoding index (``{name: {"enc", "shape", "dtype", ...}}``) of an encoded
    payload, without decoding the tensors."""
    return _index(_decompress(blob))


def decode_state_dict(blob: bytes) -> dict[str, torch.Tensor]:
    """The state dict an ``encode_state_dict`` payload holds, bit for bit."""
    blob = _decompress(blob)
    index = _index(blob)
    _within_memory(len(blob) + _decoded_bytes(index), "the decoded tensors")
    tensors = load_safetensors(blob)
    out = {}
    for name, meta in index.items():
        prefix = f"{name}::"
        parts = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if name in tensors:
            parts[""] = tensors[name]
        out[name] = decode_tensor(meta, parts)
    return out
