"""reduce_range follows the CPU's int8 instructions."""

from __future__ import annotations

import pytest

from compress_cli.quantization.cpu import choose_reduce_range


@pytest.mark.parametrize(
    ("flags", "machine", "expected"),
    [
        ({"avx2", "fma"}, "x86_64", True),  # AVX2 without VNNI: u8*s8 pairs saturate int16
        ({"avx2", "avx512f", "avx512_vnni"}, "x86_64", False),
        ({"avx2", "avx_vnni"}, "x86_64", False),
        ({"avx2", "amx_int8"}, "x86_64", False),
        ({"neon"}, "aarch64", False),
    ],
)
def test_reduce_range_follows_the_cpu(flags, machine, expected):
    on, why = choose_reduce_range(flags, machine)
    assert on is expected and why
