"""Issue 2 benchmarks: (a) the finetune training loop vs a plain hand-written PyTorch loop on the
same model, data and device (epoch-time ratio, medians over alternating repeats); (b) wall time of
`compress --help` and `compress validate`.

    python benchmarks/bench_foundation.py [--repeats 3] [--limit-train 12000]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from compress_cli.config.recipe import Recipe
from compress_cli.engine.setup import build_state
from compress_cli.training import TrainOptions, train

REPO = Path(__file__).resolve().parents[1]


def plain_epoch(model, loader, lr):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for x, y in loader:
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def bench_loop(repeats: int, limit_train: int, source: str, model_name: str) -> dict:
    d = {
        "name": "bench",
        "device": "cpu",
        "model": {"source": model_name},
        "data": {"source": source, "limit_train": limit_train, "batch_size": 128},
    }
    state = build_state(Recipe.model_validate(d), torch.device("cpu"), Path("/tmp/bench-out"))
    base = copy.deepcopy(state.model)
    loader = state.data.loader("train")
    opts = TrainOptions(epochs=1, lr=1e-3, optimizer="adam")
    ours, plain = [], []
    for _ in range(repeats):
        m = copy.deepcopy(base)
        t0 = time.perf_counter()
        plain_epoch(m, loader, 1e-3)
        plain.append(time.perf_counter() - t0)
        m = copy.deepcopy(base)
        t0 = time.perf_counter()
        train(m, state, opts, validate=False)
        ours.append(time.perf_counter() - t0)
    p, o = statistics.median(plain), statistics.median(ours)
    return {"plain_s": p, "ours_s": o, "ratio": o / p, "samples": len(state.data.train_dataset)}


def cli_time(args: list[str], repeats: int = 5) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "compress_cli", *args], capture_output=True, check=False)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> str:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit-train", type=int, default=12000)
    a = ap.parse_args()
    fashion = Path("/usr/share/datasets/fashion-mnist").is_dir()
    src, model = ("fashion_mnist", "zoo:fashion_cnn") if fashion else ("digits", "zoo:digits_cnn")
    r = bench_loop(a.repeats, a.limit_train, src, model)
    help_s = cli_time(["--help"])
    val_s = cli_time(["validate", str(REPO / "recipes/quickstart.yaml")])
    lines = [
        "## Issue 2: foundation",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on this machine ({torch.get_num_threads()} torch threads, "
        "CPU), "
        f"medians of {a.repeats} alternating repeats.",
        "",
        "| measurement | value |",
        "|---|---|",
        f"| finetune epoch, plain PyTorch loop ({model}, {r['samples']} {src} samples, batch 128) | "
        f"{r['plain_s']:.2f} s |",
        f"| finetune epoch, compress `train()` (same model, data, optimizer) | {r['ours_s']:.2f} s |",
        f"| overhead ratio ours / plain (target ≤ 1.05) | {r['ratio']:.3f} |",
        f"| `compress --help` wall time | {help_s:.2f} s |",
        f"| `compress validate recipes/quickstart.yaml` wall time | {val_s:.2f} s |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
