"""Issue 4 measurements on the embedded digits set (CPU, one thread, seeds 0-2):

1. lr_find: train the same epochs with the suggested lr and with the default lr (0.01, the
   TrainOptions default) using Adam and SGD (momentum 0.9); lr_find sweeps with the same optimizer.
   Compare test accuracy.
2. hpo: 10 trials (TPE, median pruner) of a 6-epoch fine-tuning over lr / optimizer /
   weight decay / batch size, against the default configuration trained the same 6 epochs;
   compare validation accuracy (the search's objective) and test accuracy; count pruned trials
   and the epochs they saved. Run with enqueue_defaults on (trial 0 = the configured values) and
   off (the search alone).

Usage: PYTHONPATH=. python benchmarks/bench_tuning.py [--seeds 0 1 2] [--json out.json]
Prints a markdown table per measurement.
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

import torch


def make_state(model: str, seed: int, out: Path) -> Any:
    from compress_cli.config.recipe import Recipe
    from compress_cli.engine.setup import build_state

    recipe = Recipe.model_validate(
        {
            "name": "bench",
            "seed": seed,
            "device": "cpu",
            "model": {"source": model},
            "data": {"source": "digits", "batch_size": 64},
            "output": str(out),
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    return build_state(recipe, torch.device("cpu"), out)


def accuracy(state: Any, split: str) -> float:
    from compress_cli.runtime.measure import evaluate
    from compress_cli.runtime.runners import EagerRunner

    return evaluate(EagerRunner(state.model, state.device), state.data.loader(split), state.data.num_classes)[
        "accuracy"
    ]


def run_stage(state: Any, type_: str, index: int = 1, **cfg: Any) -> Any:
    from compress_cli.stages.registry import get_stage

    cls = get_stage(type_)
    return cls(cls.config_class.model_validate({"type": type_, **cfg}), index).run(state)


def bench_lr_find(models: list[str], seeds: list[int], epochs: int, tmp: Path) -> list[dict[str, Any]]:
    from compress_cli.training import TrainOptions, train

    rows = []
    for model in models:
        for optimizer in ("adam", "sgd"):
            for seed in seeds:
                state = make_state(model, seed, tmp / f"lr-{model}-{optimizer}-{seed}")
                t0 = time.perf_counter()
                res = run_stage(state, "lr_find", optimizer=optimizer)
                t_find = time.perf_counter() - t0
                lr = state.hparams["lr"]
                init = copy.deepcopy(state.model.state_dict())
                out = {
                    "model": model,
                    "optimizer": optimizer,
                    "seed": seed,
                    "lr_found": lr,
                    "reliable": res.details["reliable"],
                    "find_s": round(t_find, 2),
                }
                for name, value in (("found", lr), ("default", 0.01)):
                    state.model.load_state_dict(init)
                    torch.manual_seed(seed)
                    train(state.model, state, TrainOptions(epochs=epochs, lr=value, optimizer=optimizer))
                    out[f"test_{name}"] = accuracy(state, "test")
                    out[f"val_{name}"] = accuracy(state, "val")
                rows.append(out)
                print(json.dumps(out), flush=True)
    return rows


def bench_hpo(seeds: list[int], n_trials: int, epochs: int, tmp: Path) -> list[dict[str, Any]]:
    from compress_cli.training import TrainOptions, train

    rows = []
    for seed, enqueue in [(s, e) for e in (True, False) for s in seeds]:
        state = make_state("zoo:digits_mlp", seed, tmp / f"hpo-{seed}-{enqueue}")
        base = copy.deepcopy(state.model)
        torch.manual_seed(seed)
        default_state = copy.copy(state)
        default_state.model = copy.deepcopy(base)
        train(default_state.model, default_state, TrainOptions(epochs=epochs, batch_size=64))
        val_default, test_default = accuracy(default_state, "val"), accuracy(default_state, "test")
        t0 = time.perf_counter()
        res = run_stage(
            state,
            "hpo",
            n_trials=n_trials,
            sampler="tpe",
            sampler_startup_trials=4,
            pruner="median",
            pruner_startup_trials=3,
            storage="memory",
            enqueue_defaults=enqueue,
            stages=[{"type": "finetune", "epochs": epochs, "batch_size": 64}],
            space={
                "finetune.lr": {"float": [1e-4, 0.3], "log": True},
                "finetune.optimizer": {"categorical": ["sgd", "adam", "adamw"]},
                "finetune.weight_decay": {"categorical": [0.0, 1e-5, 1e-4, 1e-3]},
                "finetune.batch_size": {"categorical": [32, 64, 128]},
            },
        )
        t_search = time.perf_counter() - t0
        d = res.details
        epochs_run = sum(t["epochs_reported"] for t in d["trials"])
        default_trial = [t for t in d["trials"] if t.get("defaults")]
        out = {
            "seed": seed,
            "enqueue_defaults": enqueue,
            "val_default": val_default,
            "test_default": test_default,
            "val_default_trial": default_trial[0]["values"][0] if default_trial else None,
            "val_best": d["best"]["values"][0],
            "test_best": accuracy(state, "test"),
            "complete": d["counts"]["complete"],
            "pruned": d["counts"]["pruned"],
            "failed": d["counts"]["fail"],
            "epochs_run": epochs_run,
            "epochs_without_pruning": n_trials * epochs,
            "best_params": d["best"]["params"],
            "search_s": round(t_search, 1),
        }
        rows.append(out)
        print(json.dumps(out), flush=True)
    return rows


def pct(x: float) -> str:
    return f"{x * 100:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=5, help="lr_find comparison: training epochs")
    ap.add_argument("--hpo-trials", type=int, default=10)
    ap.add_argument("--hpo-epochs", type=int, default=6)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        lr_rows = bench_lr_find(["zoo:digits_mlp", "zoo:digits_cnn"], args.seeds, args.epochs, tmp)
        hpo_rows = bench_hpo(args.seeds, args.hpo_trials, args.hpo_epochs, tmp)
    print(f"\n### lr_find vs default lr 0.01, {args.epochs} epochs, test accuracy % (median over seeds)\n")
    print("| model | optimizer | lrs found | found lr | default lr | seeds found >= default |")
    print("|---|---|---|---|---|---|")
    for m, o in sorted({(r["model"], r["optimizer"]) for r in lr_rows}):
        rs = [r for r in lr_rows if r["model"] == m and r["optimizer"] == o]
        lrs = ", ".join(f"{r['lr_found']:.2g}" + ("" if r["reliable"] else "*") for r in rs)
        wins = sum(r["test_found"] >= r["test_default"] for r in rs)
        print(
            f"| {m} | {o} | {lrs} | {pct(statistics.median(r['test_found'] for r in rs))} | "
            f"{pct(statistics.median(r['test_default'] for r in rs))} | {wins}/{len(rs)} |"
        )
    print(
        f"\n### hpo ({args.hpo_trials} trials, TPE, median pruner) vs default config, "
        f"{args.hpo_epochs} epochs\n"
    )
    print(
        "| enqueue_defaults | seed | val default | val best | test default | test best | complete | pruned | "
        "epochs run / without pruning | search s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in hpo_rows:
        print(
            f"| {r['enqueue_defaults']} | {r['seed']} | {pct(r['val_default'])} | {pct(r['val_best'])} | "
            f"{pct(r['test_default'])} | {pct(r['test_best'])} | {r['complete']} | {r['pruned']} | "
            f"{r['epochs_run']} / {r['epochs_without_pruning']} | {r['search_s']} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"lr_find": lr_rows, "hpo": hpo_rows}, indent=2))


if __name__ == "__main__":
    main()
