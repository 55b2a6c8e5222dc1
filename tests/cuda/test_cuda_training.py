"""AMP in the training loop and batch_size_find's out-of-memory search, on CUDA and (the same
bodies, where the path allows) on CPU.

- AMP: bf16 autocast where the GPU has bf16, else fp16 autocast with a GradScaler; the fp16 path is
  forced on a bf16 GPU by making ``torch.cuda.is_bf16_supported`` say no. The layers' outputs are in
  the autocast dtype, the master weights stay fp32, the scaler steps the optimizer, the model learns.
  On CPU the same body checks that nothing is autocast and no scaler is made.
- an explicit ``amp: true`` on CPU is ignored with a note; the default stays quiet.
- batch_size_find on CUDA meets a real out-of-memory error (a model that allocates a set fraction
  of the free GPU memory per sample), keeps searching, and leaves the memory freed.
"""

from __future__ import annotations

import pytest
import torch

from compress_cli.training import TrainOptions, train


class Recorder:
    """Forward hook: the dtype of every output of the layer it is registered on."""

    def __init__(self) -> None:
        self.dtypes: set[torch.dtype] = set()

    def __call__(self, module, args, output) -> None:
        self.dtypes.add(output.dtype)


@pytest.mark.parametrize("half", ["bf16", "fp16"])
def test_amp_training_autocasts_scales_and_learns(device, half, make_state, monkeypatch):
    if device.type == "cpu" and half == "fp16":
        pytest.skip("on CPU both cases take the same fp32 path (the bf16 case checks it)")
    if device.type == "cuda":
        if half == "bf16" and not torch.cuda.is_bf16_supported():
            pytest.skip("this GPU has no bf16: the loop uses fp16 (the other case)")
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: half == "bf16")
    scalers: list[torch.amp.GradScaler] = []
    steps = [0]

    class CountingScaler(torch.amp.GradScaler):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            scalers.append(self)

        def step(self, *a, **k):
            steps[0] += 1
            return super().step(*a, **k)

    monkeypatch.setattr(torch.amp, "GradScaler", CountingScaler)
    state = make_state(device)
    rec = Recorder()
    state.model.fc1.register_forward_hook(rec)
    before = state.model.fc1.weight.detach().clone()
    res = train(state.model, state, TrainOptions(epochs=2, lr=0.003, batch_size=64), label="t")

    assert state.model.fc1.weight.dtype == torch.float32  # master weights stay fp32
    assert state.model.fc1.weight.device.type == device.type
    assert not torch.equal(before, state.model.fc1.weight.detach())
    losses = [h["train_loss"] for h in res.history]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert res.history[-1]["val_accuracy"] > 0.5  # 2 epochs of digits from random init: ~0.9
    if device.type == "cpu":
        assert rec.dtypes == {torch.float32} and scalers == [] and res.amp == ""
        return
    dtype = torch.bfloat16 if half == "bf16" else torch.float16
    assert dtype in rec.dtypes  # training forwards autocast (validation runs in fp32)
    if half == "bf16":
        assert scalers == [] and res.amp == "amp bf16"
    else:
        assert len(scalers) == 1 and res.amp == "amp fp16 with GradScaler"
        assert steps[0] == 2 * len(state.data.loader("train", batch_size=64))  # every step through it
        assert scalers[0].get_scale() > 0


def test_amp_on_cpu_is_ignored_with_a_note(make_state):
    from compress_cli.events import RunListener
    from compress_cli.stages.registry import get_stage

    messages: list[str] = []

    class Listen(RunListener):
        def on_message(self, text: str) -> None:
            messages.append(text)

    state = make_state("cpu")
    state.ctx.listener = Listen()
    cls = get_stage("finetune")
    stage = cls(
        cls.config_class.model_validate({"type": "finetune", "amp": True, "max_steps_per_epoch": 2}), 1
    )
    res = stage.run(state)
    assert "amp ignored on cpu (mixed precision runs on CUDA only; trained in fp32)" in res.notes
    assert any(m.startswith("finetune: amp ignored on cpu") for m in messages)
    messages.clear()
    default = cls(cls.config_class.model_validate({"type": "finetune", "max_steps_per_epoch": 2}), 1)
    assert "amp" not in default.run(state).notes and not any("amp" in m for m in messages)


@pytest.mark.cuda
def test_batch_size_find_recovers_from_a_real_cuda_out_of_memory(make_state):
    from torch import nn

    from compress_cli.stages.registry import get_stage

    free, _ = torch.cuda.mem_get_info()
    per_sample = free // 200 // 4  # floats: batch 200 asks for all the free memory, at once

    class Hungry(nn.Module):
        """digits_mlp's first layer and head, plus one transient tensor of per_sample floats a sample."""

        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

        def forward(self, x):
            big = x.flatten(1)[:, :1].expand(-1, per_sample) * 2.0  # allocated on the GPU: b * per_sample
            return self.fc(x) + big.mean(1, keepdim=True) * 0

    state = make_state("cuda")
    state.model = Hungry().cuda()
    cls = get_stage("batch_size_find")
    cfg = {"type": "batch_size_find", "mode": "max", "start": 8, "max_batch_size": 400, "steps": 2}
    res = cls(cls.config_class.model_validate({**cfg, "margin": 0.1, "multiple_of": 8}), 1).run(state)
    found = res.details["largest_fitting"]
    rows = {r["batch_size"]: r for r in res.details["probes"]}
    assert any(r.get("reason") == "out of memory" for r in rows.values()), rows
    assert 100 <= found < 200, rows  # the other tensors take a little of the memory
    assert rows[found]["fits"] and not rows[found + 1]["fits"]  # bisected to the exact limit
    assert state.hparams["batch_size"] == (int(found * 0.9) // 8) * 8
    assert torch.cuda.memory_allocated() < 256 * 2**20  # nothing of the failed probes is held
    assert torch.cuda.memory_reserved() < free // 4  # the cache was emptied after the failures
