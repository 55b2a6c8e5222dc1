"""benchmarks/gpu_bench.py (scripts/gpu_check.sh's timing table) runs its code on CPU: every row
kind and variant, the markdown and JSON it writes, and the clean skip without CUDA."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

SPEC = importlib.util.spec_from_file_location(
    "compress_gpu_bench", Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bench.py"
)
assert SPEC is not None and SPEC.loader is not None
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def tiny(name: str, size: int) -> nn.Module:
    """A 3-channel classifier with 1000 outputs (as the torchvision ones), seconds to time on CPU."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 1000)
    ).eval()


def test_every_row_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "build", tiny)
    argv = ["--device", "cpu", "--models", "a,b", "--size", "16", "--batches", "1,4", "--iterations", "0,1"]
    assert bench.main([*argv, "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "gpu_results.json").read_text())
    assert [(r["model"], r["kind"], r["variant"]) for r in rows[:6]] == [
        ("a", "train", "fp32"),
        ("a", "train", "amp"),
        ("a", "infer", "fp32"),
        ("a", "infer", "fp16"),
        ("a", "infer", "bf16"),
        ("a", "infer", "int8_weight_only"),
    ]
    assert len(rows) == 12 and not any("error" in r for r in rows)
    assert all(r["per_s"] > 0 for r in rows)
    md = (tmp_path / "gpu_results.md").read_text()
    assert "| a | int8_weight_only |" in md and "AMP = the training loop's choice here: off (not CUDA)" in md
    fp32 = [line for line in md.splitlines() if line.startswith(("| a | fp32 |", "| b | fp32 |"))]
    assert len(fp32) == 4 and all(line.endswith("| 1.00x |") for line in fp32)  # the references


def test_a_failing_cell_is_a_row_and_a_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "build", tiny)
    argv = ["--device", "cpu", "--models", "a", "--variants", "fp32,nope", "--size", "16", "--batches", "1,2"]
    assert bench.main([*argv, "--iterations", "0,1", "--out", str(tmp_path)]) == 1
    rows = json.loads((tmp_path / "gpu_results.json").read_text())
    assert rows[-1]["variant"] == "nope" and "error" in rows[-1]
    assert "| a | nope | failed:" in (tmp_path / "gpu_results.md").read_text()


def test_without_cuda_it_skips_cleanly(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    assert bench.main(["--out", str(tmp_path)]) == 0
    assert "no CUDA: skipped" in capsys.readouterr().out
    assert not (tmp_path / "gpu_results.md").exists()
