"""batch_size_find: the search on synthetic fit functions, out-of-memory handling, the CPU memory
estimate, throughput choice, lr scaling and the `batch_size: auto` rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from compress_cli.config.recipe import Recipe
from compress_cli.config.yaml import parse_yaml
from compress_cli.errors import RecipeError, StageError
from compress_cli.stages.registry import get_stage, validate
from compress_cli.training import TrainOptions
from compress_cli.tuning import Probe, apply_margin, pick_throughput, probe_batch, search_max_batch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_state(tmp_path: Path, model: str = "zoo:digits_mlp", **data):
    from compress_cli.engine.setup import build_state

    recipe = Recipe.model_validate(
        {
            "name": "t",
            "device": "cpu",
            "model": {"source": model},
            "data": {"source": "digits", **data},
            "output": str(tmp_path / "out"),
        }
    )
    return build_state(recipe, torch.device("cpu"), tmp_path / "out")


def run_stage(state, **cfg):
    cls = get_stage("batch_size_find")
    return cls(cls.config_class.model_validate({"type": "batch_size_find", **cfg}), 1).run(state)


# ------------------------------------------------------------------ search logic
@pytest.mark.parametrize("limit,start,cap", [(300, 8, 4096), (5, 8, 4096), (1000, 16, 600), (64, 64, 4096)])
def test_search_finds_the_largest_fitting_batch(limit, start, cap):
    calls = []

    def fits(b):
        calls.append(b)
        return b <= limit

    found, how = search_max_batch(fits, start, cap)
    assert found == min(limit, cap)
    assert len(calls) == len(set(calls))  # no size probed twice
    assert len(calls) <= 2 * 13  # doubling + bisection: logarithmic
    if limit >= cap:
        assert how == "capped"


def test_search_reports_when_nothing_fits():
    assert search_max_batch(lambda b: False, 8, 100) == (None, "even batch 1 does not fit")


def test_margin_and_rounding():
    assert apply_margin(300, 0.1, 8) == 264  # 270 rounded down to a multiple of 8
    assert apply_margin(5, 0.1, 8) == 4  # below the multiple: not rounded
    assert apply_margin(1, 0.5, 8) == 1


def test_throughput_pick_prefers_the_smallest_near_best():
    probes = [
        Probe(32, True, samples_per_s=900.0),
        Probe(64, True, samples_per_s=1000.0),
        Probe(128, True, samples_per_s=980.0),
        Probe(256, False, "out of memory"),
    ]
    assert pick_throughput(probes, 0.05).batch_size == 64
    assert pick_throughput(probes, 0.15).batch_size == 32


# ------------------------------------------------------------------ probes on a real model
class OomAbove(nn.Module):
    """Raises CUDA's out-of-memory error for batches larger than ``limit`` (simulated on CPU)."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.net(x)


def test_out_of_memory_is_caught_and_the_model_restored(tmp_path):
    state = make_state(tmp_path)
    state.model = OomAbove(100)
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    res = run_stage(state, mode="max", max_memory_gb=1.0, start=16, margin=0.0, multiple_of=1, steps=2)
    assert state.hparams["batch_size"] == 100 == res.details["largest_fitting"]
    rows = {r["batch_size"]: r for r in res.details["probes"]}
    assert rows[128]["fits"] is False and rows[128]["reason"] == "out of memory"
    assert all(torch.equal(before[k], v) for k, v in state.model.state_dict().items())
    assert all(p.grad is None for p in state.model.parameters())


def test_cpu_memory_estimate_grows_with_the_batch(tmp_path):
    state = make_state(tmp_path, model="zoo:digits_cnn")
    opts = TrainOptions(epochs=1, lr=1e-3)
    m = {b: probe_batch(state.model, state, opts, b, 2, limit_bytes=None).memory_bytes for b in (16, 32, 64)}
    per_sample = (m[64] - m[32]) / 32
    assert per_sample > 0
    assert (m[32] - m[16]) / 16 == pytest.approx(per_sample, rel=0.05)  # activations: linear in the batch
    # a limit between the 64- and the 128-sample estimates puts the largest fitting batch in between
    limit_gb = (m[64] + 32 * per_sample) / 2**30
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    res = run_stage(state, mode="max", max_memory_gb=limit_gb, start=16, margin=0.1, steps=2)
    found = res.details["largest_fitting"]
    assert 64 < found < 128
    assert state.hparams["batch_size"] == apply_margin(found, 0.1, 8)
    assert all(torch.equal(before[k], v) for k, v in state.model.state_dict().items())  # BN stats too


def test_throughput_mode_and_lr_scaling(tmp_path):
    state = make_state(tmp_path, batch_size=32)
    state.hparams["lr"] = 0.01
    res = run_stage(state, start=16, max_batch_size=64, steps=3, scale_lr=True)  # CPU, no limit: throughput
    bs = state.hparams["batch_size"]
    assert res.details["mode"] == "throughput"
    assert bs in (16, 32, 64) and [r["batch_size"] for r in res.details["probes"]] == [16, 32, 64]
    assert all(r["samples_per_s"] > 0 for r in res.details["probes"])
    assert state.hparams["lr"] == pytest.approx(0.01 * bs / 32)
    assert res.details["reference_batch_size"] == 32


def test_scale_lr_without_an_lr_is_an_error(tmp_path):
    state = make_state(tmp_path)
    with pytest.raises(StageError, match="scale_lr: no lr to scale"):
        run_stage(state, mode="max", max_memory_gb=1.0, start=32, max_batch_size=64, steps=2, scale_lr=True)


def test_batch_size_auto_needs_a_finder():
    def text(stages):
        return yaml.safe_dump(
            {"version": 1, "name": "t", "model": {"source": "zoo:digits_mlp"}, "stages": stages}
        )

    ok = validate(parse_yaml(text([{"type": "batch_size_find"}, {"type": "finetune", "batch_size": "auto"}])))
    assert ok.stages[1].batch_size == "auto"
    with pytest.raises(
        RecipeError, match=r"stages\[0\] \(finetune\).batch_size: 'auto' needs batch_size_find"
    ):
        validate(parse_yaml(text([{"type": "finetune", "batch_size": "auto"}])))


def test_fake_out_of_memory_drives_the_bisection_cache_emptying_and_margin(tmp_path, monkeypatch):
    """torch.OutOfMemoryError above batch 100, injected on CPU: the doubling and bisection probe
    exactly the sizes the search should, the CUDA cache is emptied (``_free_cuda``) once per failed
    probe, after the failed step's tensors are gone (the traceback no longer holds them), and the margin
    and rounding give the final batch."""
    import weakref

    freed_when_emptied: list[bool] = []
    last: list[weakref.ref] = []
    tried: list[int] = []

    class Oom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

        def forward(self, x):
            if not tried or tried[-1] != x.shape[0]:
                tried.append(x.shape[0])
            held = torch.empty(x.shape[0], 1024)  # what a failed CUDA step would hold
            last[:] = [weakref.ref(held)]
            if x.shape[0] > 100:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return self.net(x)

    from compress_cli.tuning import batch_size as bsf

    real_free = bsf._free_cuda

    def free_cuda() -> None:  # gc, then torch.cuda.empty_cache() where there is CUDA
        real_free()
        freed_when_emptied.append(last[0]() is None)

    state = make_state(tmp_path)
    state.model = Oom()
    monkeypatch.setattr(bsf, "_free_cuda", free_cuda)
    res = run_stage(state, mode="max", max_memory_gb=1.0, start=16, margin=0.1, multiple_of=8, steps=2)
    assert tried == [16, 32, 64, 128, 96, 112, 104, 100, 102, 101]  # doubling, then bisection
    failed = [r["batch_size"] for r in res.details["probes"] if not r["fits"]]
    assert failed == [101, 102, 104, 112, 128]
    assert all(r["reason"] == "out of memory" for r in res.details["probes"] if not r["fits"])
    assert freed_when_emptied == [True] * len(failed)
    assert res.details["largest_fitting"] == 100 and res.details["search"] == "limit between 100 and 101"
    assert state.hparams["batch_size"] == 88  # 100 less 10 % = 90, rounded down to a multiple of 8
