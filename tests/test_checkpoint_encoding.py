"""Tensor encodings of the compressed checkpoint: bit-exact round trips for every encoding and
dtype, the size-based choice, gap-coded positions, and files written by the first encoder."""

from __future__ import annotations

import lzma

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compress_cli.checkpoint.codec import (
    decode_gaps,
    decode_state_dict,
    decode_tensor,
    encode_gaps,
    encode_state_dict,
    encode_tensor,
)

INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    v = INT_VIEW[a.element_size()]
    return torch.equal(a.contiguous().view(v), b.contiguous().view(v))


def roundtrip(t: torch.Tensor) -> tuple[torch.Tensor, str]:
    meta, parts = encode_tensor("t", t)
    parts = {
        k: p if isinstance(p, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(p))
        for k, p in parts.items()
    }
    return decode_tensor(meta, parts), meta["enc"]


def sparse(shape, density, seed=0, values=None):
    g = torch.Generator().manual_seed(seed)
    t = (
        torch.randn(shape, generator=g)
        if values is None
        else values[torch.randint(0, len(values), shape, generator=g)]
    )
    t[torch.rand(shape, generator=g) >= density] = 0
    return t


def cases():
    g = torch.Generator().manual_seed(1)
    c16 = torch.randn(16, generator=g)
    grid = torch.randint(-127, 128, (8, 512), generator=g).float() * torch.rand(8, 1, generator=g)
    special = torch.randn(200, generator=g)
    special[::3] = -0.0
    special[1], special[2], special[4] = float("nan"), float("inf"), float("-inf")
    return {
        "dense": (torch.randn(64, 300, generator=g), "shuffle"),
        "sparse50": (sparse((5000,), 0.5), "sparse+shuffle"),
        "sparse10": (sparse((4000,), 0.1), "gaps+shuffle"),
        "sparse1": (sparse((100000,), 0.01), "gaps+shuffle"),
        "palette": (c16[torch.randint(0, 16, (30, 30), generator=g)], "palette"),
        "sparse_palette": (sparse((40, 40), 0.3, values=c16), "sparse+palette"),
        "gaps_palette": (sparse((200, 200), 0.05, values=c16), "gaps+palette"),
        "rowgrid": (grid, "rowgrid"),  # rows that are int8 multiples of a per-row scale
        "rowpalette": (
            torch.randn(8, 100, generator=g).gather(1, torch.randint(0, 100, (8, 512), generator=g)),
            "rowpalette",
        ),
        "special_values": (special, None),
        "fp16": (torch.randn(300, generator=g).half(), "shuffle"),
        "bf16_sparse": (sparse((600,), 0.3).bfloat16(), None),
        "fp64": (torch.randn(50, generator=g, dtype=torch.float64), "shuffle"),
        "int64": (torch.arange(100), "raw"),
        "tiny": (torch.randn(5, generator=g), "raw"),
        "all_zero": (torch.zeros(300), "gaps"),
        "long_runs": (
            torch.zeros(3000).index_fill_(0, torch.tensor([0, 255, 256, 766, 2999]), 1.5),
            "gaps+bf16",
        ),
        "scalar": (torch.tensor(3.0), "raw"),
        "fp16_values_in_fp32": (torch.randn(500, generator=g).half().float(), "f16+shuffle"),
        "bf16_values_in_fp32": (torch.randn(500, generator=g).bfloat16().float(), "bf16+shuffle"),
        "sparse_fp16_palette": (sparse((100, 100), 0.05, values=c16.half().float()), "gaps+f16+palette"),
        "big_not_fp16": (torch.randn(500, generator=g).half().float() * 1e6, "shuffle"),
    }


@pytest.mark.parametrize("name", list(cases()))
def test_every_encoding_round_trips_bit_exactly(name):
    t, want = cases()[name]
    back, enc = roundtrip(t)
    assert bits_equal(back, t), enc
    if want is not None:
        assert enc == want


def test_state_dict_round_trip_and_negative_zero_is_kept():
    sd = {k: t for k, (t, _) in cases().items()}
    blob, index = encode_state_dict(sd)
    assert blob[:6] == b"\xfd7zXZ\x00"  # a standard xz stream: any xz tool opens it
    back = decode_state_dict(blob)
    assert set(back) == set(sd) and all(bits_equal(back[k], sd[k]) for k in sd)
    assert torch.signbit(back["special_values"][0]) and back["special_values"][0] == 0


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(16, 3000),
    density=st.floats(0.0, 1.0),
    codes=st.one_of(st.none(), st.integers(1, 300)),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_round_trip_property(n, density, codes, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    vals = None if codes is None else torch.randn(codes, generator=g)
    t = sparse((n,), density, seed, values=vals).to(dtype)
    back, _ = roundtrip(t)
    assert bits_equal(back, t)


@pytest.mark.parametrize("gaps", [[0], [254], [255], [256], [509, 510, 0, 1], [1000, 0, 0, 300]])
def test_gap_stream_round_trip(gaps):
    n = sum(gaps) + len(gaps) + 7
    mask = np.zeros(n, dtype=bool)
    mask[np.cumsum(np.array(gaps) + 1) - 1] = True
    stream = encode_gaps(mask)
    assert stream.dtype == np.uint8 and int((stream < 255).sum()) == len(gaps)
    assert np.array_equal(decode_gaps(stream, n), mask)


def test_palette_packs_at_the_real_bit_width_and_is_not_used_when_larger():
    c = torch.randn(8)
    t = c[torch.randint(0, 8, (10000,))]
    meta, parts = encode_tensor("w", t)
    assert meta["enc"] == "palette" and meta["bits"] == 3 and parts["idx"].nbytes == 10000 * 3 // 8
    bias = torch.randn(128)  # 128 distinct values: a palette would be larger than the values
    assert encode_tensor("b", bias)[0]["enc"] == "shuffle"


def test_gap_coding_beats_a_bitmask_on_very_sparse_tensors():
    t = sparse((200000,), 0.02)
    meta, parts = encode_tensor("w", t)
    assert meta["enc"].startswith("gaps")
    bitmask = np.packbits((t != 0).numpy())
    assert len(lzma.compress(parts["gaps"].tobytes())) < len(lzma.compress(bitmask.tobytes()))


def test_16_bit_values_take_2_bytes():
    t = torch.randn(4096).half().float()
    meta, parts = encode_tensor("w", t)
    assert meta["enc"] == "f16+shuffle" and parts["planes"].nbytes == 2 * 4096
    assert decode_tensor(meta, {k: torch.from_numpy(v) for k, v in parts.items()}).dtype == torch.float32


def test_shuffled_floats_compress_better_than_plain_ones():
    t = torch.randn(64, 1024) * 0.02
    blob, _ = encode_state_dict({"w": t})
    assert len(blob) < 0.95 * len(lzma.compress(t.numpy().tobytes(), preset=6))


def test_files_written_by_the_first_encoder_still_decode():
    """Format 1 as first written: float palettes/values, 'sparse' bitmask, uint8 indices."""
    from safetensors.torch import save

    c = torch.tensor([-0.5, 0.25, 1.0, 2.0])
    idx = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0] * 8, dtype=torch.uint8)
    mask = torch.zeros(128, dtype=torch.bool)
    mask[::2] = True
    values = torch.randn(64)
    planes = ((idx.numpy()[:, None] >> np.arange(2, dtype=np.uint8)) & 1).astype(np.uint8)
    packed = torch.from_numpy(np.packbits(planes.reshape(-1)))
    import json

    index = {
        "p": {"shape": [64], "dtype": "float32", "bits": 2, "enc": "palette"},
        "s": {"shape": [128], "dtype": "float32", "nnz": 64, "enc": "sparse"},
        "r": {"shape": [3], "dtype": "float32", "enc": "raw"},
    }
    tensors = {
        "p::palette": c,
        "p::idx": packed,
        "s::mask": torch.from_numpy(np.packbits(mask.numpy())),
        "s::values": values,
        "r": torch.ones(3),
    }
    blob = lzma.compress(save(tensors, metadata={"index": json.dumps(index, indent=1)}), preset=6)
    back = decode_state_dict(blob)
    assert torch.equal(back["p"], c[idx.long()])
    full = torch.zeros(128)
    full[mask] = values
    assert torch.equal(back["s"], full) and torch.equal(back["r"], torch.ones(3))


def test_negative_zeros_of_a_masked_product_stay_sparse_and_exact():
    w = torch.randn(100, 100)
    t = w * (torch.rand(100, 100) > 0.9)  # masked negatives become -0.0
    assert int(torch.signbit(t[t == 0]).sum()) > 1000
    meta, parts = encode_tensor("w", t)
    assert meta["enc"].startswith("gaps") and meta["nnz"] == int((t != 0).sum()) and meta["negzero"] > 1000
    back, _ = roundtrip(t)
    assert bits_equal(back, t)


def test_pruned_export_has_positive_zeros():
    import torch.nn.utils.prune as tp

    from compress_cli.checkpoint import export_state_dict

    lin = torch.nn.Linear(50, 50)
    tp.l1_unstructured(lin, "weight", amount=0.9)
    w = export_state_dict(lin)["weight"]
    assert int((w == 0).sum()) == 2250 and not torch.signbit(w[w == 0]).any()
    assert "negzero" not in encode_tensor("w", w)[0]


def test_skewed_palette_indices_are_stored_one_per_byte():
    g = torch.Generator().manual_seed(0)
    levels = torch.linspace(-1, 1, 16)
    t = levels[
        (torch.randn(20000, generator=g) * 1.5 + 7.5).round().clamp(0, 15).long()
    ]  # ~3 bits of entropy
    meta, parts = encode_tensor("w", t)
    assert meta["enc"] == "palette" and meta["bits"] == 4 and "idx8" in parts
    back, _ = roundtrip(t)
    assert bits_equal(back, t)
    uniform = levels[torch.randint(0, 16, (20000,), generator=g)]
    assert "idx" in encode_tensor("u", uniform)[1]
    skew_blob, _ = encode_state_dict({"w": t})
    assert len(skew_blob) < 20000 * 4 / 8 * 0.9  # below the packed 4-bit size
