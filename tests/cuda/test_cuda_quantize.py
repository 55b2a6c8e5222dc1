"""torchao weight-only int8/int4 and the fp16/bf16 casts, on CUDA, with their CPU-checkable parts.

- int8_weight_only after pruning and fine-tuning (the end-to-end order): the conversion works on
  the pruned model, pruned weights stay zero on the int8 grid, the outputs stay close (SQNR), and on
  CUDA the quantize stage's model reloads identical. On CPU the same torchao conversion
  (``quantized_copy``, what ``weight_only`` calls after checking for CUDA) is run directly.
- int4_weight_only on CUDA: bf16 in, fp32 out through the cast hooks, deterministic (what load()
  relies on), close to fp32.
- fp16 / bf16 casts on each device: weights in the dtype, fp32 in and out, reload equal.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compress_cli
from compress_cli.quantization.base import sqnr_db
from compress_cli.stages.registry import get_stage
from compress_cli.state import save_snapshot

X = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def run(state, **cfg):
    cls = get_stage(cfg["type"])
    return cls(cls.config_class.model_validate(cfg), 1).run(state)


def outputs(fn, device, x=X):
    with torch.inference_mode():
        return fn(x.to(device)).float().cpu()


def test_int8_weight_only_after_pruning_and_training(device, make_state, tmp_path):
    from compress_cli.quantization.weight_only import quantized_copy

    state = make_state(device)
    run(state, type="prune", sparsity=0.5, scope="global")
    run(state, type="finetune", epochs=1, max_steps_per_epoch=3, lr=0.003)
    assert hasattr(state.model.fc1, "weight_orig")  # still pruned: the mask is a forward hook
    zeros = state.model.fc1.weight.detach() == 0
    assert zeros.float().mean() > 0.2
    reference = outputs(state.model, device)
    if device.type == "cpu":
        runtime = quantized_copy(state.model, 8, 128, device)
    else:
        res = run(state, type="quantize", scheme="int8_weight_only")
        assert res.details["device"].startswith("cuda")
        runtime = state.runner.model
    w = runtime.fc1.weight
    assert type(w).__module__.startswith("torchao")  # a torchao quantized tensor
    assert bool((w.dequantize()[zeros] == 0).all())  # pruned weights stay exactly zero
    assert sqnr_db(reference, outputs(runtime, device)) > 30
    if device.type == "cuda":
        save_snapshot(state, tmp_path / "m")
        assert torch.equal(outputs(state.runner, device), outputs(compress_cli.load(tmp_path / "m"), device))


@pytest.mark.cuda
def test_int4_weight_only_is_deterministic_bf16_inside_and_close():
    from compress_cli.quantization.weight_only import WeightOnly

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).eval()
    x = torch.randn(8, 256)
    reference = outputs(model, "cpu", x)
    entry = {"type": "quantize", "scheme": "int4_weight_only", "group_size": 64}
    a = WeightOnly().build_runtime(model, entry, torch.device("cuda"))
    b = WeightOnly().build_runtime(model, entry)  # load(): no device given, the default CUDA one
    assert next(model.parameters()).dtype == torch.float32  # the stored module is left as it was
    out = outputs(a, "cuda", x)
    assert out.dtype == torch.float32 and torch.equal(out, outputs(b, "cuda", x))
    assert sqnr_db(reference, out) > 10  # 4-bit weights in groups of 64: about 20 dB


@pytest.mark.parametrize("scheme", ["fp16", "bf16"])
def test_half_casts_run_on_the_device_and_reload(device, scheme, make_state, tmp_path):
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[scheme]
    state = make_state(device)
    reference = outputs(state.model, device)
    run(state, type="quantize", scheme=scheme)
    assert state.model.fc1.weight.dtype == dtype and state.model.fc1.weight.device.type == device.type
    got = outputs(state.current_runner(), device)  # fp32 in, fp32 out
    assert got.dtype == torch.float32
    assert sqnr_db(reference, got) > 25  # half precision: about 40 dB
    save_snapshot(state, tmp_path / "m")
    reloaded = compress_cli.load(tmp_path / "m").to(device)
    assert reloaded.fc1.weight.dtype == dtype
    assert torch.equal(outputs(reloaded, device), got)
