"""Interleaved CPU latency/throughput of compressed model directories against a reference one
(same process, rotating order, medians): ``python benchmarks/speed_check.py REF DIR [DIR ...]``.
Ratios from this are robust on a shared machine where a pipeline's sequential measurements are not."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    from bench_structured import interleaved_latency

    from compress_cli import load
    from compress_cli.checkpoint import read_manifest

    threads = 1
    args = sys.argv[1:]
    if args and args[0].startswith("--threads="):
        threads = int(args.pop(0).split("=")[1])
    torch.set_num_threads(threads)
    models = {a: load(a) for a in args}
    shape = read_manifest(args[0])["input_shape"]
    l1 = interleaved_latency(models, torch.randn(1, *shape), rounds=21, iters=20)
    l64 = interleaved_latency(models, torch.randn(64, *shape), rounds=11, iters=4)
    ref = args[0]
    print(f"threads {threads}")
    for a in args:
        print(
            f"{a}: batch-1 {l1[a]:.3f} ms ({l1[ref] / l1[a]:.2f}x), batch-64 {64e3 / l64[a]:.0f}/s "
            f"({l64[ref] / l64[a]:.2f}x)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
