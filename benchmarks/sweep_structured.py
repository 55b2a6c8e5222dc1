"""Which torchvision classification architectures `prune_channels` and `drop_layers` handle.

For every model in ``torchvision.models.list_models(module=torchvision.models)`` (random init,
10 classes, a small input), in its own subprocess with a timeout:

- prune_channels: 30% of channels (l1, per layer) -> forward finite with the same output shape ->
  architecture diff (JSON round trip) rebuilt from the source -> outputs equal;
- drop_layers: 1 block (similarity on one random batch) -> the same checks.

Writes ``benchmarks/sweep_structured.md`` (bench_structured.py puts it into RESULTS.md).

    python benchmarks/sweep_structured.py [--timeout 120] [NAME ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def model_kwargs(name: str) -> tuple[dict, int]:
    """Constructor kwargs and input size for a small random-init run."""
    kw: dict = {"num_classes": 10}
    size = 64
    if name.startswith("vit_"):
        size = 56 if name.endswith("_14") else 64
        kw["image_size"] = size
    elif name == "inception_v3":
        kw.update(aux_logits=False, init_weights=False)
        size = 96
    elif name == "googlenet":
        kw.update(aux_logits=False, init_weights=False)
    elif name == "maxvit_t":
        size = 224
    return kw, size


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:220]


def check_rebuild(spec: dict, model, x) -> None:
    import torch

    from compress_cli.checkpoint import apply_architecture_diff, architecture_diff
    from compress_cli.sources.models import build_from_source

    diff = json.loads(json.dumps(architecture_diff(build_from_source(spec), model)))
    again = apply_architecture_diff(build_from_source(spec), diff)
    again.load_state_dict(model.state_dict())
    again.eval()
    with torch.no_grad():
        y, y2 = model(x), again(x)
    if not torch.isfinite(y).all():
        raise RuntimeError("outputs not finite")
    if not torch.equal(y, y2):
        raise RuntimeError(f"reloaded outputs differ (max {float((y - y2).abs().max()):.3g})")


def one(name: str) -> dict:
    import copy

    import torch

    from compress_cli.pruning import drop_layers, prune_channels
    from compress_cli.runtime.measure import count_macs
    from compress_cli.sources.models import build_from_source

    torch.set_num_threads(1)
    kw, size = model_kwargs(name)
    spec = {"source": f"torchvision:{name}", "kwargs": kw}
    out: dict = {"model": name, "input": size}
    t0 = time.perf_counter()
    base = build_from_source(spec).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    out["params_m"] = round(sum(p.numel() for p in base.parameters()) / 1e6, 2)
    macs0 = count_macs(base, x[:1])
    for step in ("prune_channels", "drop_layers"):
        model = copy.deepcopy(base)
        ts = time.perf_counter()
        try:
            if step == "prune_channels":
                res = prune_channels(model, x[:1], ratio=0.3)
                macs1 = count_macs(model, x[:1])
                info = (
                    f"{res.channels_removed} ch removed, MACs x{macs1 / macs0:.2f}" if macs0 and macs1 else ""
                )
            else:
                calib = [(x, torch.tensor([0, 1]))]
                cands, chosen, _ = drop_layers(model, x[:1], calib, criterion="similarity", count=1)
                info = f"{len(cands)} candidates; removed {chosen[0].name} ({chosen[0].replacement})"
            check_rebuild(spec, model.eval(), x)
            out[step] = {"ok": True, "info": info, "s": round(time.perf_counter() - ts, 1)}
        except Exception as e:
            out[step] = {"ok": False, "info": first_line(e), "s": round(time.perf_counter() - ts, 1)}
    out["s"] = round(time.perf_counter() - t0, 1)
    return out


def table(rows: list[dict], timeout: int) -> str:
    def cell(r: dict, step: str) -> str:
        if "timeout" in r:
            return f"timeout ({timeout}s)" if step == "prune_channels" else "-"
        if "crash" in r:
            return f"crash: {r['crash']}"
        s = r[step]
        if not s["ok"] and "no removable layer" in s["info"]:
            return "none: no residual block or shape-preserving layer (refused with StageError)"
        return ("pass: " if s["ok"] else "FAIL: ") + s["info"].replace("|", "\\|")

    ok = {s: sum(1 for r in rows if s in r and r[s]["ok"]) for s in ("prune_channels", "drop_layers")}
    none = sum(1 for r in rows if "drop_layers" in r and "no removable layer" in r["drop_layers"]["info"])
    lines = [
        f"Sweep of {len(rows)} torchvision classification models (random init, 10 classes, small input, "
        f"1 CPU thread, {timeout}s per model): prune_channels passes {ok['prune_channels']}, drop_layers "
        "passes "
        f"{ok['drop_layers']} (and finds nothing to remove in {none}). Pass = forward finite with the same "
        "output shape, and the architecture diff "
        "rebuilt from the model source gives equal outputs. `python benchmarks/sweep_structured.py`.",
        "",
        "| model | input | params (M) | prune_channels (30%, l1) | drop_layers (1, similarity) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r.get('input', '')} | {r.get('params_m', '')} | {cell(r, 'prune_channels')} "
            f"| {cell(r, 'drop_layers')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*")
    ap.add_argument("--timeout", type=int, default=120)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.one)), flush=True)
        return 0
    import torchvision

    names = args.names or torchvision.models.list_models(module=torchvision.models)
    jsonl = HERE / "sweep_structured.jsonl"
    done = {}
    if jsonl.exists() and not args.names:
        done = {r["model"]: r for r in map(json.loads, jsonl.read_text().splitlines())}
    rows = []
    for name in names:
        if name in done:
            rows.append(done[name])
            continue
        try:
            res = subprocess.run(
                [sys.executable, __file__, "--one", name],
                capture_output=True,
                text=True,
                timeout=args.timeout,
                cwd=ROOT,
            )
            got = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
            if got:
                row = json.loads(got[-1][7:])
            else:
                err = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
                row = {"model": name, "crash": (err[-1] if err else f"exit {res.returncode}")[:200]}
        except subprocess.TimeoutExpired:
            row = {"model": name, "timeout": True}
        rows.append(row)
        with jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    if not args.names:
        (HERE / "sweep_structured.md").write_text(table(rows, args.timeout))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
