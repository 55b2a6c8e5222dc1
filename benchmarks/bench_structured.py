"""Issue 7 benchmarks, side by side in one run (CPU, medians of interleaved repeats):

(a) our ``prune_channels`` (reloaded through ``compress_cli.load``) vs torch-pruning used directly
    at the same ratio on torchvision resnet18 (224x224, batch 1): MACs and latency ratio;
(b) ``drop_layers`` on resnet18 trained briefly on a Fashion-MNIST subset (padded to 3x32x32):
    blocks removed, latency ratio, accuracy after a short fine-tune vs the same extra training
    without removal.

Prints a markdown section (``make bench`` merges it into RESULTS.md), with the torchvision sweep
table from ``sweep_structured.md`` appended when present. ``--quick`` shrinks (b) for a smoke run.
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

QUICK = "--quick" in sys.argv
FASHION = Path("/usr/share/datasets/fashion-mnist")


def interleaved_latency(models: dict, x: torch.Tensor, rounds: int = 15, iters: int = 5) -> dict[str, float]:
    """Median ms per call of each model, timing them in turn round after round, the order rotating
    every round (the machine is shared: every model sees the same load)."""
    times: dict[str, list[float]] = {k: [] for k in models}
    keys = list(models)
    with torch.inference_mode():
        for m in models.values():
            m.eval()
            for _ in range(3):
                m(x)
        for r in range(rounds):
            for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
                m = models[k]
                t0 = time.perf_counter()
                for _ in range(iters):
                    m(x)
                times[k].append((time.perf_counter() - t0) / iters * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def part_a() -> list[str]:
    import torch_pruning as tp

    from compress_cli import load
    from compress_cli.checkpoint import save_model
    from compress_cli.pruning import layer_widths, prune_channels
    from compress_cli.runtime.measure import count_macs
    from compress_cli.sources.models import build_from_source

    spec = {"source": "torchvision:resnet18", "kwargs": {}}
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    original = build_from_source(spec).eval()
    ours = copy.deepcopy(original)
    t0 = time.perf_counter()
    prune_channels(ours, x, importance="l1", ratio=0.5)
    t_ours = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        save_model(
            ours,
            Path(d) / "m",
            base=build_from_source(spec),
            model_spec=spec,
            input_shape=[3, 224, 224],
            num_classes=1000,
        )
        reloaded = load(Path(d) / "m")
    direct = copy.deepcopy(original)
    t0 = time.perf_counter()
    pruner = tp.pruner.BasePruner(
        direct,
        x,
        importance=tp.importance.GroupMagnitudeImportance(p=1),
        pruning_ratio=0.5,
        ignored_layers=[direct.fc],
    )
    pruner.step()
    t_direct = time.perf_counter() - t0
    with torch.no_grad():
        same_out = torch.equal(reloaded(x), direct.eval()(x))
    same_widths = layer_widths(reloaded) == layer_widths(direct)
    macs = {k: count_macs(m, x) for k, m in (("original", original), ("ours", reloaded), ("direct", direct))}
    lat = interleaved_latency({"original": original, "ours": reloaded, "direct": direct}, x)
    params = {
        k: sum(p.numel() for p in m.parameters())
        for k, m in (("original", original), ("ours", reloaded), ("direct", direct))
    }
    return [
        "### (a) prune_channels vs torch-pruning directly — resnet18, 224x224, batch 1, ratio 0.5 (l1)",
        "",
        "| | params | MACs | latency ms (median) | speedup vs original |",
        "|---|---|---|---|---|",
        *(
            f"| {k} | {params[k]:,} | {macs[k]:,} | {lat[k]:.2f} | {lat['original'] / lat[k]:.2f}x |"
            for k in lat
        ),
        "",
        f"- same layer widths: {same_widths}; identical outputs (ours after save + `compress_cli.load`, "
        f"direct in memory): {same_out}",
        f"- MACs equal: {macs['ours'] == macs['direct']}; **latency ratio ours/direct = "
        f"{lat['direct'] / lat['ours']:.3f}** "
        f"(speed of ours relative to direct; >= 0.95 required)",
        f"- pruning time: ours {t_ours:.1f} s (incl. tracing and checks), direct {t_direct:.1f} s; threads "
        f"{torch.get_num_threads()}",
        "",
    ]


def fashion_32(limit_train: int, limit_test: int):
    from torch.utils.data import TensorDataset

    from compress_cli.config.recipe import DataConfig
    from compress_cli.sources.data import build_data

    b = build_data(
        DataConfig(
            source="fashion_mnist",
            root=str(FASHION),
            batch_size=128,
            limit_train=limit_train,
            limit_test=limit_test,
            val_fraction=0.1,
        ),
        0,
    )

    def up(ds):
        x, y = ds.tensors
        return TensorDataset(F.pad(x, (2, 2, 2, 2)).repeat(1, 3, 1, 1).contiguous(), y)

    b.train_dataset, b.test_dataset = up(b.train_dataset), up(b.test_dataset)
    b.val_dataset = up(b.val_dataset) if b.val_dataset is not None else None
    b.input_shape = (3, 32, 32)
    b._calib = None
    return b


def accuracy(model, loader) -> float:
    model.eval()
    ok = n = 0
    with torch.inference_mode():
        for x, y in loader:
            ok += int((model(x).argmax(1) == y).sum())
            n += len(y)
    return ok / n


def part_b() -> list[str]:
    from compress_cli.sources.models import build_from_source
    from compress_cli.stages.registry import get_stage
    from compress_cli.testing import tiny_state
    from compress_cli.training import TrainOptions, train

    torch.manual_seed(0)
    n_train, n_test, epochs = (1500, 500, 1) if QUICK else (4000, 1000, 3)
    data = fashion_32(n_train, n_test)
    model = build_from_source({"source": "torchvision:resnet18", "kwargs": {"num_classes": 10}})
    state = tiny_state(model)
    state.data = data
    opts = TrainOptions(epochs=epochs, lr=0.002, optimizer="adamw", weight_decay=0.01, scheduler="cosine")
    t0 = time.perf_counter()
    train(state.model, state, opts, validate=False)
    t_train = time.perf_counter() - t0
    test = data.loader("test")
    acc0 = accuracy(state.model, test)
    trained = copy.deepcopy(state.model)
    ft = TrainOptions(epochs=1, lr=0.0005, optimizer="adamw", weight_decay=0.01, scheduler="cosine")
    # control: the same extra epoch without removal
    control = copy.deepcopy(trained)
    train(control, state, ft, validate=False)
    acc_control = accuracy(control, test)
    rows = []
    cls = get_stage("drop_layers")
    for count in (1, 2, 3):
        state.model = copy.deepcopy(trained)
        stage = cls(
            cls.config_class.model_validate({"type": "drop_layers", "count": count, "importance": "loss"})
        )
        res = stage.run(state)
        acc_cut = accuracy(state.model, test)
        train(state.model, state, ft, validate=False)
        acc_ft = accuracy(state.model, test)
        x1 = torch.randn(1, 3, 32, 32)
        lat = interleaved_latency({"orig": trained, "cut": state.model}, x1)
        x64 = torch.randn(64, 3, 32, 32)
        lat64 = interleaved_latency({"orig": trained, "cut": state.model}, x64, rounds=9, iters=2)
        rows.append(
            (
                count,
                ", ".join(res.details["removed"]),
                res.details["params_after"] / res.details["params_before"],
                acc_cut,
                acc_ft,
                lat["orig"] / lat["cut"],
                lat64["orig"] / lat64["cut"],
            )
        )
    return [
        f"### (b) drop_layers on resnet18 — Fashion-MNIST subset ({n_train} train / {n_test} test, padded to "
        "3x32x32)",
        "",
        f"resnet18 (random init, 10 classes) trained {epochs} epoch(s) (AdamW, cosine; {t_train:.0f} s): "
        "test accuracy "
        f"**{acc0 * 100:.2f}%**; one more epoch without removal (control): {acc_control * 100:.2f}%. "
        "drop_layers (importance `loss` on the calibration batches), then the same one-epoch fine-tune:",
        "",
        "| blocks removed | which | params kept | acc. right after | acc. after 1-epoch fine-tune | batch-1 "
        "speedup | batch-64 speedup |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {c} | {w} | {p * 100:.0f}% | {a * 100:.2f}% | {f * 100:.2f}% | {s1:.2f}x | {s64:.2f}x |"
            for c, w, p, a, f, s1, s64 in rows
        ),
        "",
    ]


def main() -> int:
    torch.set_num_threads(1)  # a shared 2-core machine: one thread gives stable ratios
    lines = [
        "## Issue 7: structured pruning and layer removal",
        "",
        "Measured by `benchmarks/bench_structured.py` on this machine's CPU (1 thread; the machine is shared "
        "with other jobs, so every ratio comes from interleaved timings in one process, order rotating).",
        "",
    ]
    lines += part_a()
    if FASHION.is_dir():
        lines += part_b()
    else:
        lines += ["(b) skipped: Fashion-MNIST not found at " + str(FASHION), ""]
    sweep = HERE / "sweep_structured.md"
    if sweep.exists():
        lines += ["### (c) torchvision sweep", "", sweep.read_text()]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
