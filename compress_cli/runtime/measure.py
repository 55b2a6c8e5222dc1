"""Measurement, the same for every stage: accuracy/loss, params/nonzeros, size, MACs, latency.

:func:`measure_all` is the measurement policy: the pipeline calls it after every stage and hpo
scores its trials with it, so a number means the same wherever it appears.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress_cli.report import Metrics

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    from compress_cli.config.recipe import LatencyConfig, MeasureConfig
    from compress_cli.runtime.runners import Runner
    from compress_cli.sources.data.bundle import DataBundle
    from compress_cli.tasks.base import Task


def measure_all(
    runner: Runner,
    model: nn.Module,
    data: DataBundle,
    device: torch.device,
    cfg: MeasureConfig,
    *,
    model_dir: Path | None = None,
    reference: Metrics | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Metrics:
    """Every metric of ``model`` run through ``runner``, the same for every stage.

    ``device`` is where ``model`` lives (MACs are counted there); ``cfg`` chooses the split,
    whether MACs are counted and the latency settings (None: no timing);
    ``model_dir`` holds the saved checkpoint whose bytes are ``size_bytes`` (None: not sized);
    ``reference`` (the baseline) adds ``accuracy_drop``, ``size_ratio``, ``speedup`` and
    ``throughput_ratio``; ``on_batch(n)`` is called after each evaluated batch of ``n`` samples.
    """
    from compress_cli._utils.batches import to_device
    from compress_cli.checkpoint import checkpoint_size

    task = data.get_task()
    m: dict[str, Any] = {}
    scores = evaluate(runner, data.loader(cfg.split), task, on_batch=on_batch, split=cfg.split)
    m.update(task.report_fields(scores))
    m.update(param_counts(model))
    if model_dir is not None:
        m["size_bytes"] = checkpoint_size(model_dir)
    m["macs"] = count_macs(model, to_device(data.example_input(1), device)) if cfg.macs else None
    if cfg.latency is not None:
        m.update(latency(runner, data.example_input, cfg.latency))
    else:
        m.update({"latency_ms": None, "throughput": None})
    m.update(runner.describe())
    metrics = Metrics(**m)
    if reference is not None:
        if metrics.accuracy is not None and reference.accuracy is not None:
            metrics.accuracy_drop = round((reference.accuracy - metrics.accuracy) * 100, 4)
        if metrics.score is not None and reference.score is not None:
            metrics.metric_drop = metrics.drop_from(reference)
        fp32, size = reference.fp32_bytes, metrics.size_bytes
        metrics.size_ratio = fp32 / size if fp32 is not None and size else None
        if metrics.latency_ms and reference.latency_ms:
            metrics.speedup = reference.latency_ms / metrics.latency_ms
            assert metrics.throughput is not None and reference.throughput is not None
            metrics.throughput_ratio = metrics.throughput / reference.throughput
    return metrics


def evaluate(
    runner: Runner | Any,
    loader: DataLoader,
    task: Task,
    on_batch: Callable[[int], None] | None = None,
    split: str | None = None,
) -> dict[str, float]:
    """The task's metrics of ``runner`` over ``loader`` (with ``samples``); ``on_batch(n)`` after
    each batch of ``n`` samples (progress). ``split`` names an unshuffled evaluation split, so the
    original model's outputs (tasks that compare with it) are cached per batch."""
    import torch

    from compress_cli._utils.batches import batch_size

    if hasattr(runner, "prepare"):
        runner.prepare()
    ev = task.evaluator()
    with torch.inference_mode():
        for i, batch in enumerate(loader):
            inputs, target = task.split(batch)
            pred = task.select(runner(inputs), inputs).float().cpu()
            ref = None
            if task.needs_reference:
                ref = task.reference_output(inputs, None if split is None else (split, i)).float().cpu()
            ev.update(pred, target, ref)
            if on_batch is not None:
                on_batch(batch_size(inputs))
    if ev.samples == 0:
        from compress_cli.errors import StageError

        raise StageError("evaluation split is empty")
    return ev.compute()


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


def count_macs(model: nn.Module, example: Any) -> int | None:
    """Multiply-accumulates of one forward pass at batch 1 (FLOPs / 2 from torch's counter);
    ``example`` is the model's inputs (a tensor, tuple or dict)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from compress_cli._utils.batches import call

    try:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            call(model, example)
        return int(counter.get_total_flops() // 2)
    except Exception:
        return None


@contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` inside (None: unchanged), restored after."""
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


def time_calls(fn: Any, x: Any, device: torch.device, warmup: int, iterations: int) -> list[float]:
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


def latency(runner: Runner, example: Callable[[int], Any], cfg: LatencyConfig) -> dict[str, Any]:
    """p50/p90 latency (ms) at the first batch size, throughput (samples/s) at the last;
    ``example(n)`` gives the model inputs of ``n`` real samples (what the model is timed on)."""
    import torch

    from compress_cli._utils.batches import describe, to_device

    runner.prepare()
    device = runner.input_device()
    out: dict[str, Any] = {}
    with cpu_threads(cfg.threads), torch.inference_mode():
        b0 = cfg.batch_sizes[0]
        x = to_device(example(b0), device)
        if not isinstance(x, torch.Tensor):  # structured: say what was timed (e.g. the sequence length)
            out["latency_input"] = describe(x)
        t = time_calls(runner, x, device, cfg.warmup, cfg.iterations)
        qs = statistics.quantiles(t, n=10) if len(t) >= 2 else [t[0]] * 9
        out["latency_ms"] = statistics.median(t) * 1e3
        out["latency_p90_ms"] = qs[8] * 1e3
        out["latency_batch"] = b0
        bl = cfg.batch_sizes[-1]
        if bl != b0:
            x = to_device(example(bl), device)
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
