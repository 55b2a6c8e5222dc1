"""Measurement, the same for every stage: accuracy/loss, params/nonzeros, MACs, latency."""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    from compress_cli.config.recipe import LatencyConfig
    from compress_cli.runtime.runners import Runner


def evaluate(
    runner: Runner | Any, loader: DataLoader, num_classes: int, emit: Any = None
) -> dict[str, float]:
    """top-1 (and top-5 when more than 5 classes) accuracy as fractions, and mean CE loss."""
    import torch
    import torch.nn.functional as F

    if hasattr(runner, "prepare"):
        runner.prepare()
    correct1 = correct5 = 0
    loss_sum = 0.0
    n = 0
    with torch.inference_mode():
        for x, y in loader:
            out = runner(x).float().cpu()
            loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
            pred = out.argmax(1)
            correct1 += int((pred == y).sum())
            if num_classes > 5:
                top5 = out.topk(5, dim=1).indices
                correct5 += int((top5 == y[:, None]).any(1).sum())
            n += len(y)
            if emit:
                emit("eval_step", n=len(y))
    if n == 0:
        from compress_cli.errors import StageError

        raise StageError("evaluation split is empty")
    res = {"accuracy": correct1 / n, "loss": loss_sum / n, "samples": n}
    if num_classes > 5:
        res["top5"] = correct5 / n
    return res


def param_counts(model: nn.Module) -> dict[str, Any]:
    """params and nonzero params over the state's floating tensors (masked weights count as zero)."""
    from compress_cli.checkpoint import export_state_dict

    total = nonzero = 0
    for name, t in export_state_dict(model).items():
        if not t.is_floating_point() or name.endswith(("running_mean", "running_var")):
            continue
        total += t.numel()
        nonzero += int((t != 0).sum())
    return {"params": total, "nonzero_params": nonzero, "sparsity": 1 - nonzero / total if total else 0.0}


def count_macs(model: nn.Module, example: torch.Tensor) -> int | None:
    """Multiply-accumulates of one forward pass at batch 1 (FLOPs / 2 from torch's counter)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    try:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(example)
        return int(counter.get_total_flops() // 2)
    except Exception:
        return None


@contextmanager
def cpu_threads(n: int | None):
    import torch

    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Any, x: torch.Tensor, device: torch.device, warmup: int, iterations: int) -> list[float]:
    """Wall time of each call in seconds, after warm-up, synchronising the device around each."""
    for _ in range(warmup):
        fn(x)
    _sync(device)
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        fn(x)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def latency(
    runner: Runner, input_shape: tuple[int, ...], cfg: LatencyConfig, seed: int = 0
) -> dict[str, Any]:
    """p50/p90 latency (ms) at the first batch size, throughput (samples/s) at the last."""
    import torch

    runner.prepare()
    g = torch.Generator().manual_seed(seed)
    device = runner.input_device()
    out: dict[str, Any] = {}
    with cpu_threads(cfg.threads), torch.inference_mode():
        b0 = cfg.batch_sizes[0]
        x = torch.randn(b0, *input_shape, generator=g).to(device)
        t = time_calls(runner, x, device, cfg.warmup, cfg.iterations)
        qs = statistics.quantiles(t, n=10) if len(t) >= 2 else [t[0]] * 9
        out["latency_ms"] = statistics.median(t) * 1e3
        out["latency_p90_ms"] = qs[8] * 1e3
        out["latency_batch"] = b0
        bl = cfg.batch_sizes[-1]
        if bl != b0:
            x = torch.randn(bl, *input_shape, generator=g).to(device)
            t = time_calls(runner, x, device, max(1, cfg.warmup // 2), max(3, cfg.iterations // 2))
        out["throughput"] = bl / statistics.median(t)
        out["throughput_batch"] = bl
    out["threads"] = torch.get_num_threads() if cfg.threads is None else cfg.threads
    return out


def fp32_state_dict_bytes(model: nn.Module) -> int:
    """Size of the model's fp32 state_dict saved with torch.save (the reference for size ratios)."""
    import io

    import torch

    from compress_cli.checkpoint import export_state_dict

    buf = io.BytesIO()
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in export_state_dict(model).items()}
    torch.save(sd, buf)
    return buf.tell()
