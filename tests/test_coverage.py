"""A representative subset of the torchvision coverage sweep (benchmarks/coverage.py), as slow tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

# loaded by path: the name "coverage" belongs to coverage.py, which pytest plugins may have imported
_spec = importlib.util.spec_from_file_location(
    "compress_coverage_sweep", Path(__file__).resolve().parents[1] / "benchmarks" / "coverage.py"
)
assert _spec is not None and _spec.loader is not None
coverage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(coverage)

pytestmark = pytest.mark.slow


#: failures the sweep found that this version does not fix yet (benchmarks/COVERAGE.md): name -> why
KNOWN: dict[str, str] = {}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN[n], strict=True)) if n in KNOWN else n
        for n in coverage.REPRESENTATIVE
    ],
)
def test_torchvision_classifier_survives_every_stage(name):
    row = coverage.one(name, "onnxruntime_int8")
    failed = {step: row[step]["info"] for step in coverage.STEPS if row[step]["status"] == "fail"}
    assert not failed, failed
    assert row["reload"]["status"] == "pass" and row["export"]["status"] == "pass"
