"""Issue 3 measurements on Fashion-MNIST, from the fashion_train checkpoint (zoo:fashion_cnn):

1. prune: recipes/fashion_prune_distill.yaml (prune_channels ratio 0.7, then `distill` from the
   unpruned model) against the same recipe with `finetune` in place of `distill` (the same training
   options: epochs, optimizer, lr, schedule, weight decay, batch order). Test accuracy after each.
2. small: recipes/fashion_distill_small.yaml (a fresh zoo:fashion_cnn_small student distilled from
   the teacher) against the same student trained on the labels alone (alpha 0: plain cross-entropy,
   same loop and options); accuracy, checkpoint size and batch-1 latency against the teacher, all
   from report.json (the teacher's numbers are the run's baseline, measured in the same process).

Every run goes through compress_cli.run_recipe, so the numbers are what `compress run` reports.

Usage: PYTHONPATH=. python benchmarks/bench_distill.py [--seeds 0 1 2] [--teacher runs/fashion_train/model]
       [--limit-train 20000] [--parts prune small] [--json out.json]
Prints a markdown table per part.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
TRAIN_KEYS = (
    "epochs",
    "optimizer",
    "lr",
    "weight_decay",
    "scheduler",
    "batch_size",
    "warmup_epochs",
    "label_smoothing",
    "grad_clip",
    "max_steps_per_epoch",
)


def load_dict(name: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / "recipes" / name).read_text())


def run(d: dict[str, Any]) -> dict[str, Any]:
    from compress_cli.config.yaml import parse_yaml
    from compress_cli.engine.run import run_recipe
    from compress_cli.stages.registry import validate

    return run_recipe(validate(parse_yaml(yaml.safe_dump(d, sort_keys=False))), force=True)


MAX_STEPS: int | None = None  # --max-steps: cap every training stage (a smoke test of this script)


def prepare(d: dict[str, Any], seed: int, teacher: str, limit_train: int | None, out: Path) -> dict[str, Any]:
    d = copy.deepcopy(d)
    if MAX_STEPS:
        for st in d["stages"]:
            if st["type"] in ("distill", "finetune"):
                st["max_steps_per_epoch"] = MAX_STEPS
    d["seed"] = seed
    d["device"] = "cpu"
    d["model"]["checkpoint"] = teacher
    d["data"]["limit_train"] = limit_train
    d["measure"] = {"latency": {"batch_sizes": [1, 64], "warmup": 5, "iterations": 30}}
    d["output"] = str(out)
    return d


def as_finetune(distill: dict[str, Any]) -> dict[str, Any]:
    return {"type": "finetune", **{k: v for k, v in distill.items() if k in TRAIN_KEYS}}


def bench_prune(seeds: list[int], teacher: str, limit: int | None, tmp: Path) -> list[dict[str, Any]]:
    base = load_dict("fashion_prune_distill.yaml")
    rows = []
    for seed in seeds:
        for variant in ("finetune", "distill"):
            d = prepare(base, seed, teacher, limit, tmp / f"prune-{variant}-{seed}")
            if variant == "finetune":
                d["stages"][1] = as_finetune(d["stages"][1])
            t0 = time.perf_counter()
            r = run(d)
            pruned, final = r["stages"][0]["metrics"], r["final"]
            rows.append(
                {
                    "part": "prune",
                    "seed": seed,
                    "variant": variant,
                    "teacher_accuracy": r["baseline"]["accuracy"],
                    "pruned_accuracy": pruned["accuracy"],
                    "accuracy": final["accuracy"],
                    "params": final["params"],
                    "teacher_params": r["baseline"]["params"],
                    "size_bytes": final["size_bytes"],
                    "latency_ms": final["latency_ms"],
                    "teacher_latency_ms": r["baseline"]["latency_ms"],
                    "train_s": r["stages"][1]["duration_s"],
                    "wall_s": round(time.perf_counter() - t0, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_small(seeds: list[int], teacher: str, limit: int | None, tmp: Path) -> list[dict[str, Any]]:
    base = load_dict("fashion_distill_small.yaml")
    rows = []
    for seed in seeds:
        for variant in ("labels only (alpha 0)", "distill"):
            d = prepare(base, seed, teacher, limit, tmp / f"small-{variant[:5]}-{seed}")
            if variant != "distill":
                st = d["stages"][0]
                st["alpha"] = 0.0
                st.pop("cache_teacher", None)
            t0 = time.perf_counter()
            r = run(d)
            b, f = r["baseline"], r["final"]
            rows.append(
                {
                    "part": "small",
                    "seed": seed,
                    "variant": variant,
                    "teacher_accuracy": b["accuracy"],
                    "accuracy": f["accuracy"],
                    "teacher_params": b["params"],
                    "params": f["params"],
                    "teacher_size_bytes": b["size_bytes"],
                    "size_bytes": f["size_bytes"],
                    "teacher_latency_ms": b["latency_ms"],
                    "latency_ms": f["latency_ms"],
                    "teacher_throughput": b["throughput"],
                    "throughput": f["throughput"],
                    "train_s": r["stages"][0]["duration_s"],
                    "wall_s": round(time.perf_counter() - t0, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_latency(
    seeds: list[int], teacher: str, limit: int | None, tmp: Path, rounds: int = 21
) -> list[dict[str, Any]]:
    """Batch-1 latency and batch-64 throughput of the teacher, the 0.7-pruned teacher and the small
    student, interleaved over ``rounds`` (one thread each; medians), so load on the machine hits all
    three alike. Latency does not depend on the weights: the student is freshly built."""
    import torch

    from compress_cli.config.recipe import LatencyConfig, Recipe
    from compress_cli.engine.setup import build_state
    from compress_cli.runtime.measure import latency
    from compress_cli.runtime.runners import EagerRunner
    from compress_cli.sources.models import build_from_source
    from compress_cli.stages.registry import get_stage

    d = prepare(load_dict("fashion_prune_distill.yaml"), 0, teacher, 2000, tmp / "latency")
    d["stages"] = []
    state = build_state(Recipe.model_validate(d), torch.device("cpu"), tmp / "latency")
    cls = get_stage("prune_channels")
    cfg = cls.config_class.model_validate(load_dict("fashion_prune_distill.yaml")["stages"][0])
    cls(cfg, 1).run(state)
    models = {
        "teacher fashion_cnn": state.original_model(),
        "prune_channels 0.7": state.model,
        "fashion_cnn_small": build_from_source({"source": "zoo:fashion_cnn_small"}).eval(),
    }
    lat_cfg = LatencyConfig(batch_sizes=[1, 64], warmup=10, iterations=50, threads=1)
    times: dict[str, list[dict[str, float]]] = {k: [] for k in models}
    for r in range(rounds):
        for name, m in models.items():
            times[name].append(
                latency(EagerRunner(m, torch.device("cpu")), state.data.input_shape, lat_cfg, r)
            )
    rows = []
    for name, ts in times.items():
        rows.append(
            {
                "part": "latency",
                "model": name,
                "rounds": rounds,
                "params": sum(p.numel() for p in models[name].parameters()),
                "latency_ms": statistics.median(t["latency_ms"] for t in ts),
                "throughput": statistics.median(t["throughput"] for t in ts),
                "speedup": statistics.median(
                    a["latency_ms"] / b["latency_ms"]
                    for a, b in zip(times["teacher fashion_cnn"], ts, strict=True)
                ),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def ms(xs: list[float], scale: float = 1.0, digits: int = 2) -> str:
    xs = [x * scale for x in xs]
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.{digits}f} ± {sd:.{digits}f}"


def per_seed(rs: list[dict[str, Any]]) -> str:
    return ", ".join(f"{r['accuracy'] * 100:.2f}" for r in rs)


def table(rows: list[dict[str, Any]]) -> str:
    out = []
    prune = [r for r in rows if r["part"] == "prune"]
    if prune:
        out.append(
            "| variant | seeds | teacher acc % | after pruning % | after training % (mean ± sd) | per seed % "
            "| params (teacher) | train s |"
        )
        out.append("|---|---|---|---|---|---|---|---|")
        for v in ("finetune", "distill"):
            rs = [r for r in prune if r["variant"] == v]
            out.append(
                f"| prune_channels 0.7 + {v} | {len(rs)} | {ms([r['teacher_accuracy'] for r in rs], 100)} "
                f"| {ms([r['pruned_accuracy'] for r in rs], 100)} | {ms([r['accuracy'] for r in rs], 100)} "
                f"| {per_seed(rs)} | {rs[0]['params']} ({rs[0]['teacher_params']}) "
                f"| {ms([r['train_s'] for r in rs], 1, 0)} |"
            )
        diffs = [
            d["accuracy"] - f["accuracy"]
            for f, d in zip(
                [r for r in prune if r["variant"] == "finetune"],
                [r for r in prune if r["variant"] == "distill"],
                strict=True,
            )
        ]
        out.append(
            f"\ndistill − finetune, paired by seed: {', '.join(f'{x * 100:+.2f}' for x in diffs)} points "
            f"(mean {statistics.mean(diffs) * 100:+.2f})\n"
        )
    small = [r for r in rows if r["part"] == "small"]
    if small:
        t = small[0]
        out.append(
            "| model | seeds | test acc % (mean ± sd) | per seed % | params | size bytes | latency ms b=1 "
            "| vs teacher latency | throughput /s b=64 |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|")
        out.append(
            f"| teacher fashion_cnn | - | {ms([r['teacher_accuracy'] for r in small], 100)} | - "
            f"| {t['teacher_params']} | {t['teacher_size_bytes']} | "
            f"{ms([r['teacher_latency_ms'] for r in small], 1, 3)} "
            f"| 1 | {ms([r['teacher_throughput'] for r in small], 1, 0)} |"
        )
        for v in ("labels only (alpha 0)", "distill"):
            rs = [r for r in small if r["variant"] == v]
            ratio = [r["teacher_latency_ms"] / r["latency_ms"] for r in rs]
            out.append(
                f"| fashion_cnn_small, {v} | {len(rs)} | {ms([r['accuracy'] for r in rs], 100)} "
                f"| {per_seed(rs)} | {rs[0]['params']} | {rs[0]['size_bytes']} "
                f"| {ms([r['latency_ms'] for r in rs], 1, 3)} | {statistics.median(ratio):.2f}x faster "
                "(median) "
                f"| {ms([r['throughput'] for r in rs], 1, 0)} |"
            )
        diffs = [
            d["accuracy"] - f["accuracy"]
            for f, d in zip(
                [r for r in small if r["variant"] != "distill"],
                [r for r in small if r["variant"] == "distill"],
                strict=True,
            )
        ]
        out.append(
            f"\ndistill − labels only, paired by seed: {', '.join(f'{x * 100:+.2f}' for x in diffs)} points "
            f"(mean {statistics.mean(diffs) * 100:+.2f})\n"
        )
    lat = [r for r in rows if r["part"] == "latency"]
    if lat:
        out.append(
            f"| model (eager, 1 thread, {lat[0]['rounds']} interleaved rounds) | params | latency ms b=1 "
            "(median) "
            "| speedup vs teacher (median of per-round ratios) | throughput /s b=64 |"
        )
        out.append("|---|---|---|---|---|")
        for r in lat:
            out.append(
                f"| {r['model']} | {r['params']} | {r['latency_ms']:.3f} | {r['speedup']:.2f}x | "
                f"{r['throughput']:.0f} |"
            )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--teacher", default="runs/fashion_train/model")
    ap.add_argument("--limit-train", type=int, default=20000)
    ap.add_argument("--parts", nargs="+", default=["prune", "small"], choices=["prune", "small", "latency"])
    ap.add_argument("--rounds", type=int, default=21, help="latency part: interleaved rounds")
    ap.add_argument("--max-steps", type=int, help="cap training steps per epoch (smoke test)")
    ap.add_argument("--json", type=Path, help="append rows to this JSON-lines file")
    ap.add_argument("--from-json", type=Path, help="only print the tables for rows saved earlier")
    a = ap.parse_args()
    if a.from_json:
        print(table([json.loads(x) for x in a.from_json.read_text().splitlines() if x.strip()]))
        return
    global MAX_STEPS
    MAX_STEPS = a.max_steps
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        for part in a.parts:
            if part == "latency":
                new = bench_latency(a.seeds, a.teacher, a.limit_train, Path(tmp), a.rounds)
            else:
                new = (bench_prune if part == "prune" else bench_small)(
                    a.seeds, a.teacher, a.limit_train, Path(tmp)
                )
            rows += new
            if a.json:
                with a.json.open("a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in new)
    print(table(rows))


if __name__ == "__main__":
    main()
