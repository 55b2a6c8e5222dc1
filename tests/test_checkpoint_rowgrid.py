"""The rowgrid encoding: per-channel int8 weights stored as int8 codes + one scale per row, bit-exact."""

from __future__ import annotations

import numpy as np
import torch

from compress_cli.checkpoint.codec import decode_state_dict, encode_state_dict, encode_tensor


def per_channel_int8(shape, qmax=127, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g)
    scale = w.flatten(1).abs().amax(1) / qmax
    return (
        torch.fake_quantize_per_channel_affine(
            w, scale, torch.zeros(shape[0], dtype=torch.int32), 0, -qmax - 1, qmax
        )
        + 0.0
    )


def test_per_channel_int8_weights_are_stored_as_int8_codes_bit_exact():
    sd = {"conv.weight": per_channel_int8((64, 32, 3, 3)), "fc.weight": per_channel_int8((10, 128), qmax=63)}
    sd["fc.weight"][3] = 0  # an all-zero row (a pruned channel)
    blob, index = encode_state_dict(sd, compression="none")
    assert index["conv.weight"]["enc"] == "rowgrid" and index["fc.weight"]["enc"] == "rowgrid"
    assert len(blob) < 1.15 * (64 * 32 * 9 + 10 * 128) + 4 * 74 + 2000  # ~1 byte per weight
    out = decode_state_dict(blob)
    for k, v in sd.items():
        assert torch.equal(out[k].view(torch.int32), v.view(torch.int32))


def test_values_off_the_grid_are_not_rowgrid():
    w = per_channel_int8((16, 64))
    w[2, 5] += 1e-4
    meta, _ = encode_tensor("w", w)
    assert meta["enc"] != "rowgrid"
    neg_zero = per_channel_int8((16, 64))
    neg_zero[0, 0] = -0.0  # codes * scale never gives -0.0: must not be claimed
    meta, _ = encode_tensor("w", neg_zero)
    assert meta["enc"] != "rowgrid"
    assert np.isfinite(per_channel_int8((4, 8)).numpy()).all()


def test_rows_whose_range_is_wider_than_their_values_are_found_too():
    w = per_channel_int8((8, 300))
    scale = w.abs().amax(1, keepdim=True) / 100  # codes reach only +-100 (e.g. QAT's moving-average range)
    w = torch.round(w / scale).clamp(-128, 127) * scale + 0.0
    meta, parts = encode_tensor("w", w)
    assert meta["enc"] == "rowgrid"
