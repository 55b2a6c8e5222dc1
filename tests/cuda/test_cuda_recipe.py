"""The end-to-end CUDA recipe (recipes/cuda_e2e.yaml): prune -> finetune with AMP -> export from
CUDA -> int8_weight_only, then the checkpoint reloaded and compared with the run's report. On CPU
the same recipe runs with the one CUDA-only scheme swapped for bf16 (and shorter timing), so every
other step, the AMP note and the reload comparison are checked here."""

from __future__ import annotations

from pathlib import Path

import torch

import compress_cli
from compress_cli.runtime.measure import evaluate
from compress_cli.runtime.runners import EagerRunner
from compress_cli.testing import digits_bundle

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "cuda_e2e.yaml"


def plain(w: torch.Tensor) -> torch.Tensor:
    """A weight as fp32 values (torchao's quantized tensors dequantized)."""
    with torch.no_grad():
        return (w.dequantize() if type(w).__module__.startswith("torchao") else w.detach()).float()


def test_prune_finetune_amp_export_quantize_reload(device, tmp_path):
    cuda = device.type == "cuda"
    overrides = [f"output={tmp_path / 'out'}"]
    if not cuda:
        overrides += [
            "stages.3.scheme=bf16",
            "measure.latency=null",
            "measure.macs=false",
            "stages.1.epochs=2",
        ]
    report = compress_cli.run(RECIPE, overrides=overrides, device=device.type)
    prune, finetune, export, quantize = report["stages"]
    assert (
        ("amp bf16" in finetune["notes"] or "amp fp16" in finetune["notes"])
        if cuda
        else ("amp ignored on cpu" in finetune["notes"])
    )
    files = export["details"]["files"]
    assert set(files) == {"onnx", "torch_export"}
    assert all(f["max_abs_diff"] < 1e-3 for f in files.values())
    assert quantize["metrics"]["device"].startswith(device.type)
    final = report["final"]
    assert final["accuracy"] > 0.8 and final["sparsity"] > 0.45

    model = compress_cli.load(tmp_path / "out" / "model")
    weights = [plain(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if cuda:
        assert all(type(m.weight).__module__.startswith("torchao") for m in (model.fc1, model.fc2, model.fc3))
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros > 0.45  # the pruned weights stayed zero through training, quantization and reload
    data = digits_bundle(seed=0, batch_size=64)
    acc = evaluate(EagerRunner(model, device), data.loader("test"), data.get_task())["accuracy"]
    assert abs(acc - final["accuracy"]) <= 1 / len(data.test_dataset) + 1e-9
