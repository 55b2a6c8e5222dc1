"""The SQNR gate's measure."""

from __future__ import annotations

import pytest
import torch

from compress_cli.quantization.base import sqnr_db


def test_sqnr_db():
    a = torch.tensor([1.0, -2.0, 3.0])
    assert sqnr_db(a, a) == 200.0
    assert sqnr_db(a, a * 1.1) == pytest.approx(20.0, abs=0.01)
