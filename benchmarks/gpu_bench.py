"""CUDA timings for scripts/gpu_check.sh: ``python benchmarks/gpu_bench.py --out DIR``.

For torchvision resnet18, resnet50 and vit_b_16 (random init, 224 px):

- one training step (forward, cross-entropy, backward, SGD step) at batch 64 in fp32 and with the
  mixed precision the training loop picks (``training.loop._amp_context``: bf16 autocast where the
  GPU has bf16, else fp16 with a GradScaler);
- inference latency (batch 1) and throughput (batch 64) of the fp32 model and of what the quantize
  stage makes of it: the fp16 and bf16 casts (``quantization.cast.cast_``) and torchao
  int8_weight_only (``quantization.weight_only.weight_only``: Linear layers only, so the ResNets
  keep fp32 convolutions and only their classifier changes).

Each number is the median of CUDA-event timings of single calls after warm-up calls; the table
(markdown) goes to stdout and DIR/gpu_results.md, the rows to DIR/gpu_results.json. Without CUDA
it prints "no CUDA: skipped" and exits 0; ``--device cpu`` runs the same code on CPU with wall-clock
timing (a smoke test of the script, not a benchmark: tests/test_gpu_bench.py).

The defaults fit in about two minutes on one H100 (budgeted: warm-up and timed calls per row below).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = ("resnet18", "resnet50", "vit_b_16")
VARIANTS = ("fp32", "fp16", "bf16", "int8_weight_only")


def timer(device: torch.device) -> Callable[[Callable[[], Any], int, int], float]:
    """``time(fn, warmup, iterations)`` -> median seconds of one call: CUDA events on CUDA (recorded
    around each call on the current stream), wall clock on CPU."""

    def cuda_time(fn: Callable[[], Any], warmup: int, iterations: int) -> float:
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize(device)
        times = []
        for _ in range(iterations):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)

    def cpu_time(fn: Callable[[], Any], warmup: int, iterations: int) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iterations):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return cuda_time if device.type == "cuda" else cpu_time


def build(name: str, size: int) -> nn.Module:
    """A torchvision classifier at random init (seeded) for ``size`` px inputs."""
    import torchvision

    torch.manual_seed(0)
    kw: dict[str, Any] = {"weights": None}
    if name.startswith("vit") and size != 224:
        kw["image_size"] = size
    return getattr(torchvision.models, name)(**kw).eval()


def variant(model: nn.Module, name: str, device: torch.device) -> nn.Module:
    """``model`` as the quantize stage would run it after scheme ``name`` (fp32: a copy on ``device``)."""
    from compress_cli.quantization.cast import DTYPES, cast_

    if name == "fp32":
        return copy.deepcopy(model).to(device).eval()
    if name in DTYPES:
        return cast_(copy.deepcopy(model).to(device).eval(), DTYPES[name])
    if name != "int8_weight_only":
        raise ValueError(f"unknown variant {name!r} (one of {', '.join(VARIANTS)})")
    from compress_cli.quantization.weight_only import quantized_copy, weight_only

    if device.type == "cuda":
        return weight_only(model, 8, 128, device)
    return quantized_copy(model, 8, 128, device)  # --device cpu: the same torchao conversion


def train_step_s(model: nn.Module, amp: bool, batch: int, size: int, device: torch.device, it: Any) -> float:
    """Median seconds of one SGD training step at ``batch``, fp32 or with the loop's AMP."""
    import torch.nn.functional as F

    from compress_cli.training.loop import _amp_context

    m = copy.deepcopy(model).to(device).train()
    opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
    autocast, scaler, _ = _amp_context(device, amp)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step() -> None:
        with autocast():
            loss = F.cross_entropy(m(x), y)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()

    return it(step, *ITERATIONS["train"])


#: (warm-up calls, timed calls) per kind of row: the defaults' budget
ITERATIONS = {"train": (3, 10), "latency": (10, 50), "throughput": (5, 20)}


def amp_name(device: torch.device) -> str:
    """What the training loop's AMP is on ``device``."""
    from compress_cli.training.loop import _amp_context

    return _amp_context(device, True)[2] or "off (not CUDA)"


def run(
    models: list[str], variants: list[str], batches: tuple[int, int], size: int, device: torch.device
) -> list[dict]:
    """Every row of the table; a failing cell is a row with its error (the run goes on)."""
    it = timer(device)
    rows: list[dict[str, Any]] = []
    small, large = batches
    for name in models:
        base = build(name, size)
        for amp in (False, True):
            row: dict[str, Any] = {"model": name, "kind": "train", "variant": "amp" if amp else "fp32"}
            try:
                s = train_step_s(base, amp, large, size, device, it)
                row.update(batch=large, ms=s * 1e3, per_s=large / s)
            except Exception as e:  # e.g. out of memory: say so in the table, go on
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            rows.append(row)
            _free(device)
        for v in variants:
            row = {"model": name, "kind": "infer", "variant": v}
            try:
                m = variant(base, v, device)
                with torch.inference_mode():
                    x1 = torch.randn(small, 3, size, size, device=device)
                    xl = torch.randn(large, 3, size, size, device=device)
                    lat = it(lambda m=m, x=x1: m(x), *ITERATIONS["latency"])
                    thr = it(lambda m=m, x=xl: m(x), *ITERATIONS["throughput"])
                row.update(
                    latency_ms=lat * 1e3, latency_batch=small, per_s=large / thr, throughput_batch=large
                )
                del m
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            rows.append(row)
            _free(device)
    return rows


def _free(device: torch.device) -> None:
    """Give the last row's GPU memory back (a full collection: slow, so only on CUDA)."""
    if device.type == "cuda":
        import gc

        gc.collect()
        torch.cuda.empty_cache()


def _train_cells(r: dict, ref: dict | None) -> list[str]:
    ratio = f"{ref['ms'] / r['ms']:.2f}x" if ref else ""
    return [str(r["batch"]), f"{r['ms']:.2f}", f"{r['per_s']:.0f}", ratio]


def _infer_cells(r: dict, ref: dict | None) -> list[str]:
    lat = f"{ref['latency_ms'] / r['latency_ms']:.2f}x" if ref else ""
    thr = f"{r['per_s'] / ref['per_s']:.2f}x" if ref else ""
    return [
        f"{r['latency_ms']:.3f} ({r['latency_batch']})",
        f"{r['per_s']:.0f} ({r['throughput_batch']})",
        lat,
        thr,
    ]


#: kind -> (table header after the model and variant columns, the cells of a row given its fp32 row)
TABLES: dict[str, tuple[list[str], Callable[[dict, dict | None], list[str]]]] = {
    "train": (["batch", "ms", "images/s", "vs fp32"], _train_cells),
    "infer": (
        ["latency ms (batch)", "images/s (batch)", "latency vs fp32", "images/s vs fp32"],
        _infer_cells,
    ),
}


def table(rows: list[dict], device: torch.device, size: int) -> str:
    """The rows as markdown: training steps, then inference, each with its ratio to fp32."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    lines = [
        f"Device: {name}; torch {torch.__version__}; {size} px, random init; medians of "
        f"{'CUDA-event' if device.type == 'cuda' else 'wall-clock'} timings of single calls after warm-up.",
        f"AMP = the training loop's choice here: {amp_name(device)}.",
    ]
    for kind, (header, cells) in TABLES.items():
        title = "training step" if kind == "train" else "inference"
        lines += [
            "",
            f"| model | {title} | " + " | ".join(header) + " |",
            "|---|---|" + "---:|" * len(header),
        ]
        ok = {
            r["model"]: r for r in rows if r["kind"] == kind and r["variant"] == "fp32" and "error" not in r
        }
        for r in (r for r in rows if r["kind"] == kind):
            got = (
                [f"failed: {r['error']}"] + [""] * (len(header) - 1)
                if "error" in r
                else cells(r, ok.get(r["model"]))
            )
            lines.append(f"| {r['model']} | {r['variant']} | " + " | ".join(got) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks", help="folder for gpu_results.md and gpu_results.json")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke test of this script)")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--batches", default="1,64", help="latency batch, throughput (and training) batch")
    p.add_argument("--size", type=int, default=224, help="image side in pixels")
    p.add_argument("--iterations", default="", help="override warm-up,timed calls for every row, e.g. 1,2")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA: skipped")
        return 0
    if a.iterations:
        w, n = (int(v) for v in a.iterations.split(","))
        for k in ITERATIONS:
            ITERATIONS[k] = (w, n)
    small, large = (int(v) for v in a.batches.split(","))
    t0 = time.perf_counter()
    rows = run(a.models.split(","), a.variants.split(","), (small, large), a.size, device)
    md = table(rows, device, a.size)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_results.md").write_text(md)
    (out / "gpu_results.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(md)
    print(f"gpu_bench: {len(rows)} rows in {time.perf_counter() - t0:.0f} s -> {out / 'gpu_results.md'}")
    failed = [r for r in rows if "error" in r]
    for r in failed:
        print(f"gpu_bench: FAILED {r['model']} {r['kind']} {r['variant']}: {r['error']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
