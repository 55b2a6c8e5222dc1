"""Latency on CUDA is device time: ``runtime.measure`` synchronises around each timed call.

A kernel-bound model (eight 4096x4096 fp32 matrix products at batch 2048: milliseconds of GPU work,
microseconds to launch) shows the difference: timed without synchronisation (``time_calls`` told the
device is the CPU, so it does not sync) a call is its launch only; ``latency`` (what every report
number comes from) agrees with CUDA events recorded around the same calls. The same helpers on CPU
are checked too: there the wall time is the work.
"""

from __future__ import annotations

import statistics

import pytest
import torch
from torch import nn

from compress_cli.config.recipe import LatencyConfig
from compress_cli.runtime.measure import latency, time_calls
from compress_cli.runtime.runners import EagerRunner


def kernel_bound(device: torch.device, width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(8)]).to(device).eval()


def event_times(fn, x, warmup: int, iterations: int) -> list[float]:
    """Seconds of each call between CUDA events recorded around it on the current stream."""
    for _ in range(warmup):
        fn(x)
    torch.cuda.synchronize()
    out = []
    for _ in range(iterations):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x)
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1e3)
    return out


@pytest.mark.cuda
def test_cuda_latency_is_synchronised_and_matches_cuda_events():
    cuda = torch.device("cuda")
    model = kernel_bound(cuda, 4096)
    runner = EagerRunner(model, cuda)
    x = torch.randn(2048, 4096, device=cuda)
    with torch.inference_mode():
        unsynced = statistics.median(time_calls(runner, x, torch.device("cpu"), 3, 10))
        torch.cuda.synchronize()
        synced = statistics.median(time_calls(runner, x, cuda, 3, 10))
        events = statistics.median(event_times(runner, x, 3, 10))
    ours = latency(
        runner, lambda n: torch.randn(n, 4096), LatencyConfig(batch_sizes=[2048], warmup=3, iterations=10)
    )
    assert events > 1e-3  # kernel-bound: over a millisecond of GPU work per call
    assert unsynced < 0.25 * events  # without a sync only the launches are timed
    assert synced == pytest.approx(events, rel=0.1, abs=3e-4)
    assert ours["latency_ms"] / 1e3 == pytest.approx(events, rel=0.1, abs=3e-4)
    assert ours["throughput"] == pytest.approx(2048 / events, rel=0.15)


def test_cpu_latency_helpers_time_the_work():
    cpu = torch.device("cpu")
    model = kernel_bound(cpu, 64)
    runner = EagerRunner(model, cpu)
    cfg = LatencyConfig(batch_sizes=[1, 256], warmup=1, iterations=5, threads=1)
    out = latency(runner, lambda n: torch.randn(n, 64), cfg)
    assert out["latency_batch"] == 1 and out["throughput_batch"] == 256 and out["threads"] == 1
    assert 0 < out["latency_ms"] <= out["latency_p90_ms"]
    with torch.inference_mode():
        t = time_calls(runner, torch.randn(256, 64), cpu, 1, 5)
    assert len(t) == 5 and min(t) > 0
