"""all-MiniLM-L6-v2 compressed by the minilm_* recipes, measured the way a user would use it: each
compressed model reloaded with ``compress_cli.load()`` from its directory, its sentence embeddings
(mean pooling by the attention mask, L2-normalised) compared with the original's on the held-out
sentences, and batch-1 / batch-32 latency at a fixed sequence length, timed interleaved with the
original in this one process (medians over rounds; ratios are what to read on a shared machine).

Usage (after ``make minilm`` and the recipes' runs)::

    python benchmarks/minilm.py runs/minilm-int8 NAME=path/to/model_dir ... [--threads 1] [--rounds 7]

Prints a Markdown table and writes benchmarks/minilm_tTHREADS.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
MODEL = HERE.parent / "models" / "all-MiniLM-L6-v2"
SEQ = 64


def embed(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pooled, normalised sentence embeddings (what sentence-transformers computes)."""
    from compress_cli._utils.batches import call

    with torch.inference_mode():
        out = call(model, batch)
    hidden = out["last_hidden_state"] if isinstance(out, dict) or hasattr(out, "keys") else out[0]
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def timed(model: Any, batch: dict[str, torch.Tensor], iterations: int) -> float:
    """Median seconds of one forward pass over ``iterations`` calls (after one warm-up call)."""
    from compress_cli._utils.batches import call

    times = []
    with torch.inference_mode():
        call(model, batch)
        for _ in range(iterations):
            t0 = time.perf_counter()
            call(model, batch)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def dir_bytes(path: Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    """Measure every run directory given against the original model."""
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="run directories, or NAME=MODEL_DIR")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModel, AutoTokenizer

    import compress_cli

    tok = AutoTokenizer.from_pretrained(MODEL)
    texts = [
        json.loads(x)["text"] for x in (HERE / "text" / "unlabelled_test.jsonl").read_text().splitlines()
    ]
    enc = tok(texts, padding="max_length", max_length=SEQ, truncation=True, return_tensors="pt")
    batches = {b: {k: v[:b] for k, v in enc.items()} for b in (1, 32)}
    original = AutoModel.from_pretrained(MODEL).eval()
    fp32_bytes = sum(t.numel() * 4 for t in original.state_dict().values())
    models: dict[str, Any] = {"original fp32": original}
    rows: dict[str, dict[str, Any]] = {"original fp32": {"size_bytes": fp32_bytes, "params": fp32_bytes // 4}}
    for arg in args.runs:
        if "=" in arg:  # NAME=MODEL_DIR: an fp32 model directory (e.g. a stage's snapshot), no report
            name, _, folder = arg.partition("=")
            model_dir = Path(folder)
            m = compress_cli.load(model_dir)
            params = sum(t.numel() for t in m.state_dict().values() if isinstance(t, torch.Tensor))
        else:
            run = Path(arg)
            report = json.loads((run / "report.json").read_text())
            name, model_dir, params = report["recipe"], run / "model", report["final"]["params"]
            m = compress_cli.load(model_dir)
        models[name] = m
        rows[name] = {"size_bytes": dir_bytes(model_dir), "params": params}
    ref = embed(original, enc)
    for name, m in models.items():
        cos = (embed(m, enc) * ref).sum(1)
        rows[name].update(cosine=float(cos.mean()), cosine_min=float(cos.min()), sentences=len(texts))
    lat: dict[str, dict[int, list[float]]] = {n: {1: [], 32: []} for n in models}
    for _ in range(args.rounds):  # interleaved: every model once per round, so load drifts hit all alike
        for name, m in models.items():
            for b, its in ((1, 20), (32, 3)):
                lat[name][b].append(timed(m, batches[b], its))
    base = {b: statistics.median(lat["original fp32"][b]) for b in (1, 32)}
    for name in models:
        for b in (1, 32):
            med = statistics.median(lat[name][b])
            rows[name][f"latency_b{b}_ms"] = med * 1e3
            rows[name][f"speedup_b{b}"] = base[b] / med
        rows[name]["size_ratio"] = fp32_bytes / rows[name]["size_bytes"]
    out = {"threads": args.threads, "rounds": args.rounds, "sequence_length": SEQ, "rows": rows}
    (HERE / f"minilm_t{args.threads}.json").write_text(json.dumps(out, indent=1) + "\n")
    print(
        f"threads {args.threads}, sequence length {SEQ}, {args.rounds} interleaved rounds, "
        f"{len(texts)} sentences"
    )
    print(
        "| model | cosine to original (mean / min) | params | size | size × | b1 ms | b1 × | b32 ms | b32 × |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['cosine']:.4f} / {r['cosine_min']:.4f} | {(r['params'] or 0) / 1e6:.1f}M "
            f"| {r['size_bytes'] / 2**20:.1f} MiB | {r['size_ratio']:.2f} | {r['latency_b1_ms']:.1f} "
            f"| {r['speedup_b1']:.2f} | {r['latency_b32_ms']:.0f} | {r['speedup_b32']:.2f} |"
        )


if __name__ == "__main__":
    main()
