"""Every torchvision classifier through every stage: the coverage sweep (``make coverage``).

For every model in ``torchvision.models.list_models(module=torchvision.models)`` (random init,
10 classes, a small input, synthetic data; no downloads), in its own subprocess with a timeout,
the real stages run one after another on one pipeline ``State``, as ``compress run`` would:

    prune (0.5, global) -> prune_channels (0.3, l1) -> drop_layers (1, similarity)
    -> quantize (onnxruntime_int8 by default) -> save -> load() -> export onnx

Each step is checked: after a stage the model's outputs (in the runtime the report would measure)
are finite with shape (N, 10); ``reload`` saves the checkpoint the pipeline writes and compares
``compress_cli.load()``'s outputs with the live model's; ``export`` is the export stage, which
checks the file in ONNX Runtime against the live model. A step that fails is recorded with the
error's first line and the chain goes on from the last good model. A refusal (a stage saying up
front that it cannot apply: ``Stage.preflight`` before anything runs, as ``compress run`` does, or
drop_layers finding no removable block) is recorded as such, and the chain goes on without it.

Writes ``benchmarks/coverage.jsonl`` (one row per model, reused on reruns) and
``benchmarks/COVERAGE.md``.

    python benchmarks/coverage.py [--timeout 2400] [--scheme onnxruntime_int8] [--jobs 2] [NAME ...]

The exactness rerun: ``--only prune_channels [--max-params 60]`` runs prune_channels alone (after the
preflight) into ``coverage_exact.jsonl`` and replaces the section of COVERAGE.md that says how many
removals the exactness check confirmed and which it caught (the stage's ``details.exactness``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from sweep_structured import first_line, model_kwargs  # noqa: E402

BIG_MODEL = 200_000_000  # parameters: above, the rollback copy of the model is kept on disk
STEPS = ("prune", "prune_channels", "drop_layers", "quantize", "reload", "export")
#: a subset of architectures kept as slow tests (tests/test_coverage.py)
REPRESENTATIVE = (
    "resnet18",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "regnet_x_400mf",
    "densenet121",
    "vit_b_32",
    "convnext_tiny",
)


def stage_configs(scheme: str) -> list[dict[str, Any]]:
    return [
        {"type": "prune", "sparsity": 0.5, "scope": "global"},
        {"type": "prune_channels", "ratio": 0.3, "importance": "l1"},
        {"type": "drop_layers", "count": 1, "importance": "similarity", "if_none": "skip"},
        # random-init networks on Gaussian inputs are not what the 20 dB SQNR gate is tuned for (some
        # efficientnets land at 17-19 dB, ViT-B/16 with a re-initialised head at 9 dB); the sweep checks
        # the mechanics, so its gate only rejects garbage (a wrong scale or layout gives <= 0 dB), and
        # every row reports the SQNR it measured
        {
            "type": "quantize",
            "scheme": scheme,
            "calibration_batches": 2,
            **(
                {"min_sqnr_db": 5.0}
                if scheme in ("int8_static", "qat", "onnxruntime_int8", "int8_dynamic")
                else {}
            ),
        },
    ]


def build(name: str, out: Path, scheme: str, only: str | None = None) -> Any:
    import torch
    import yaml

    from compress_cli.config.yaml import parse_yaml
    from compress_cli.engine.setup import build_state
    from compress_cli.stages.registry import validate

    kw, size = model_kwargs(name)
    recipe = validate(
        parse_yaml(
            yaml.safe_dump(
                {
                    "version": 1,
                    "name": f"coverage-{name}",
                    "seed": 0,
                    "device": "cpu",
                    "model": {"source": f"torchvision:{name}", "kwargs": kw},
                    "data": {
                        "source": "synthetic",
                        "input_shape": [3, size, size],
                        "num_classes": 10,
                        "batch_size": 8,
                        "eval_batch_size": 8,
                        "calibration_batches": 2,
                        "kwargs": {"train_size": 32, "test_size": 16},
                    },
                    "measure": {"latency": None, "macs": False},
                    "stages": [c for c in stage_configs(scheme) if only is None or c["type"] == only],
                    "output": str(out),
                },
                sort_keys=False,
            ),
            "coverage.yaml",
        )
    )
    return build_state(recipe, torch.device("cpu"), out), recipe, size


def outputs(state: Any, x: Any) -> Any:
    import torch

    runner = state.current_runner()
    runner.prepare()
    y = runner(x).float().cpu()
    if tuple(y.shape) != (x.shape[0], 10):
        raise RuntimeError(f"output shape {tuple(y.shape)}, expected {(x.shape[0], 10)}")
    if not torch.isfinite(y).all():
        raise RuntimeError("outputs not finite")
    return y


def one(name: str, scheme: str, only: str | None = None) -> dict[str, Any]:
    """Run the chain on one model (or the ``only`` stage, without reload and export); returns its
    row (step -> {status, info, s})."""
    import torch

    from compress_cli import load
    from compress_cli.checkpoint import copy_model
    from compress_cli.engine.setup import release_memory
    from compress_cli.engine.stage_run import run_stage
    from compress_cli.errors import CompressError
    from compress_cli.stages.registry import get_stage
    from compress_cli.state import save_snapshot

    torch.set_num_threads(1)
    row: dict[str, Any] = {"model": name, "scheme": scheme}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="compress-coverage-") as tmp:
        out = Path(tmp)
        state, recipe, size = build(name, out, scheme, only)
        row["input"] = size
        # torchvision zero-initialises some heads (ViT): all-zero logits would make every check vacuous
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, m in state.model.named_modules():
                if isinstance(m, torch.nn.Linear) and not m.weight.any():
                    m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.02)
                    row.setdefault("reinit", []).append(n)
        row["params_m"] = round(sum(p.numel() for p in state.model.parameters()) / 1e6, 2)
        x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))

        def step(key: str, fn: Any) -> None:
            ts = time.perf_counter()
            try:
                info = fn() or ""
                status = "refused" if info.startswith("refused:") else "pass"
                row[key] = {
                    "status": status,
                    "info": info.removeprefix("refused: "),
                    "s": round(time.perf_counter() - ts, 1),
                }
            except Exception as e:
                row[key] = {"status": "fail", "info": first_line(e), "s": round(time.perf_counter() - ts, 1)}
            release_memory()  # as `compress run` does after each stage

        refusals = {}  # what `compress run` would refuse up front (Stage.preflight), before stage 1
        for i, cfg in enumerate(recipe.stages, start=1):
            try:
                get_stage(cfg.type)(cfg, i).preflight(state)
            except CompressError as e:
                refusals[i] = e.problems[0]
        for i, cfg in enumerate(recipe.stages, start=1):
            cls = get_stage(cfg.type)
            if i in refusals:
                row[cfg.type] = {"status": "refused", "info": refusals[i], "s": 0.0}
                continue

            def apply(cls: Any = cls, cfg: Any = cfg, i: int = i) -> str:
                # go on from the last good model after a failure (a failed stage may half-edit it);
                # the copy waits on disk for big models (ViT-H/14: a second 632M-parameter copy in
                # memory, masks included, does not fit next to the stage's own work in 24 GB)
                on_disk = sum(p.numel() for p in state.model.parameters()) > BIG_MODEL
                if on_disk:
                    torch.save(state.model, out / "before.pt")
                before = None if on_disk else copy_model(state.model)
                try:  # as `compress run` runs it: seeded, weights checked finite, errors located
                    res = run_stage(cls(cfg, i), state, seed=recipe.seed + i)
                    outputs(state, x)
                except Exception:
                    state.model = torch.load(out / "before.pt", weights_only=False) if on_disk else before
                    raise
                finally:
                    (out / "before.pt").unlink(missing_ok=True)
                note = res.notes or ""
                ex = (res.details or {}).get("exactness")
                if ex:  # the stage's proof that the structural edit computes what the masked model does
                    row.setdefault("exactness", {})[cfg.type] = ex
                if note.startswith("skipped"):
                    return f"refused: {note}"
                return note[:160]

            step(cfg.type, apply)

        def reload() -> str:
            y = outputs(state, x)
            size_bytes = save_snapshot(state, out / "model")
            with torch.inference_mode():
                y2 = load(out / "model")(x).float()
            diff = float((y2 - y).abs().max())
            if diff > 1e-4 * (1 + float(y.abs().max())):
                raise RuntimeError(f"load() outputs differ from the live model by {diff:.3g}")
            return f"{size_bytes / 1e6:.2f} MB, max diff {diff:.2g}"

        def export() -> str:
            from compress_cli.quantization.schemes import unsupported_formats

            cls = get_stage("export")
            cfg = cls.config_class(type="export", formats=["onnx"])
            entry = next((t for t in reversed(state.transforms) if t.get("type") == "quantize"), None)
            refused = unsupported_formats(
                ["onnx"], entry["scheme"] if entry else None, entry and entry.get("backend")
            )
            if refused:
                return f"refused: {refused[0]}"
            last = len(recipe.stages) + 1
            info = run_stage(cls(cfg, last), state, seed=recipe.seed + last).details["files"]["onnx"]
            return f"{info['size_bytes'] / 1e6:.2f} MB, max diff {info['max_abs_diff']:.2g}"

        if only is None:
            step("reload", reload)
            step("export", export)
    row["s"] = round(time.perf_counter() - t0, 1)
    return row


def cell(r: dict[str, Any], step: str, timeout: int) -> str:
    if "not_run" in r:
        return "not run" if step == STEPS[0] else "-"
    if "timeout" in r:
        return f"timeout ({timeout} s)" if step == STEPS[0] else "-"
    if "crash" in r:
        return f"crash: {r['crash']}" if step == STEPS[0] else "-"
    s = r.get(step)
    if s is None:
        return "-"
    text = s["info"].replace("|", "\\|").replace("\n", " ")
    return {"pass": "pass", "refused": "refused", "fail": "FAIL"}[s["status"]] + (
        f": {text}" if text and s["status"] != "pass" else ""
    )


def table(rows: list[dict[str, Any]], timeout: int, scheme: str) -> str:
    counts = {
        st: {k: sum(1 for r in rows if r.get(st, {}).get("status") == k) for k in ("pass", "refused", "fail")}
        for st in STEPS
    }
    all_ok = sum(1 for r in rows if all(r.get(st, {}).get("status") in ("pass", "refused") for st in STEPS))
    timeouts = sum(1 for r in rows if "timeout" in r)
    not_run = sum(1 for r in rows if "not_run" in r)
    lines = [
        "# Coverage: torchvision classifiers through every stage",
        "",
        f"`python benchmarks/coverage.py` (`make coverage`). {len(rows)} models from "
        "`torchvision.models.list_models(module=torchvision.models)`, random init, 10 classes, "
        f"small input, synthetic data, 1 CPU thread, {timeout} s per model. Chain: prune 0.5 (global) "
        f"-> prune_channels 0.3 (l1) -> drop_layers 1 (similarity) -> quantize {scheme} -> save + "
        "`load()` -> export onnx. A step passes when the outputs are finite with the right shape; "
        "reload: `load()` gives the live model's outputs; export: the ONNX file in ONNX Runtime matches "
        "the live model. `refused` = the stage declined up front with a reason.",
        "",
        f"**{all_ok} of {len(rows)} models pass or are refused up front at every step**; {timeouts} timed out"
        + (f"; {not_run} not run yet." if not_run else "."),
        "",
        "| step | pass | refused | fail |",
        "|---|---|---|---|",
        *[f"| {st} | {c['pass']} | {c['refused']} | {c['fail']} |" for st, c in counts.items()],
        "",
        "| model | input | params (M) | s | " + " | ".join(STEPS) + " |",
        "|---|---|---|---|" + "---|" * len(STEPS),
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r.get('input', '')} | {r.get('params_m', '')} | {r.get('s', '')} | "
            + " | ".join(cell(r, st, timeout) for st in STEPS)
            + " |"
        )
    return "\n".join(lines) + "\n" + exactness_section()


def exactness_section() -> str:
    """The prune_channels exactness rerun (``--only prune_channels``, coverage_exact.jsonl), if any."""
    path = HERE / "coverage_exact.jsonl"
    if not path.exists():
        return ""
    rows: dict[str, dict[str, Any]] = {}
    for r in map(json.loads, path.read_text().splitlines()):
        rows[r["model"]] = r
    got = {k: [r for r in rows.values() if _exact_status(r) == k] for k in EXACT_STATUSES}
    lines = [
        "",
        EXACT_HEADING,
        "",
        "`python benchmarks/coverage.py --only prune_channels [NAME ...]` (results in "
        "`coverage_exact.jsonl`): prune_channels 0.3 (l1) alone on the loaded model, after the "
        "engine-style preflight (which now runs the removal on a copy). Every removal is compared with "
        "the model whose chosen channels are zeroed at their source, on 4 samples; a mismatch refuses "
        "the stage naming the first diverging layer. "
        f"{len(rows)} models run: **{len(got['confirmed'])} confirmed exact**, "
        f"{len(got['caught'])} caught (refused: not exact), {len(got['refused'])} refused up front for "
        f"another reason, {len(got['fail'])} failed otherwise, {len(got['timeout'])} timed out.",
        "",
        "| model | params (M) | result | max abs diff | tolerance |",
        "|---|---|---|---|---|",
    ]
    for name in sorted(rows):
        r = rows[name]
        ex = r.get("exactness", {}).get("prune_channels") or {}
        st = _exact_status(r)
        info = (r.get("prune_channels") or {}).get("info", r.get("crash", ""))
        text = "" if st == "confirmed" else ": " + str(info).replace("|", "\\|")[:200]
        lines.append(
            f"| {name} | {r.get('params_m', '')} | {st}{text} | "
            f"{ex.get('max_abs_diff', ''):.3g} | {ex.get('tolerance', ''):.3g} |"
            if ex
            else f"| {name} | {r.get('params_m', '')} | {st}{text} | | |"
        )
    return "\n".join(lines) + "\n" + EXACT_NOTES


#: what the exactness rerun's rows do not say (hand-written, measured), under its table
EXACT_NOTES = """
- **swin_t, swin_v2_t** (killed by the OOM killer in the first exactness rerun) and **swin_v2_s,
  swin_v2_b** (stopped then, swin_v2_s at 7.4 GB): rerun one at a time under a 12 GB
  address-space limit (`ulimit -v`), all four are refused up front by the index-mapping bound
  (torch-pruning would map channels through their window reshapes into 67 108 864 indices; limit
  2 097 152), each in 20-26 s at a peak of 1.7 (swin_t, swin_v2_t), 2.1 (swin_v2_s) and 2.7 GB
  (swin_v2_b) resident. Index lists of that length, built as Python lists, are most likely where
  the earlier kills' memory went, as coatnet_nano's did (benchmarks/COVERAGE_TIMM.md).
- **vit_l_32** (305M parameters): confirmed exact, 65 s, 6.2 GB peak resident; **vit_l_16**
  (303M): confirmed exact, 54 s, 6.3 GB.
- **Not run here: vit_h_14 (630M parameters) and regnet_y_128gf (637M)**, twice vit_l_32's size:
  prune_channels holds the model, the preflight's pruned copy and the zeroed reference the
  exactness check compares with, so scaled by parameters from vit_l_32's 6.2 GB they would need
  about 13 GB, past the 12 GB limit these runs had on a 24 GB machine shared with other jobs. The
  full chain above ran both (before the exactness check existed).
"""


EXACT_HEADING = "## prune_channels with the exactness check"
EXACT_STATUSES = ("confirmed", "caught", "refused", "fail", "timeout")


def _exact_status(r: dict[str, Any]) -> str:
    if "timeout" in r or "crash" in r:
        return "timeout" if "timeout" in r else "fail"
    s = r.get("prune_channels") or {}
    if s.get("status") == "pass":
        return "confirmed" if r.get("exactness", {}).get("prune_channels") else "fail"
    return "caught" if "not exact" in s.get("info", "") else s.get("status", "fail")


def run_one(name: str, scheme: str, timeout: int, only: str | None = None) -> dict[str, Any]:
    try:
        res = subprocess.run(
            [sys.executable, __file__, "--one", name, "--scheme", scheme]
            + (["--only", only] if only else []),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
        )
    except subprocess.TimeoutExpired:
        return {"model": name, "scheme": scheme, "timeout": True}
    got = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if got:
        return json.loads(got[-1][7:])
    if res.returncode == -9:  # what the kernel's OOM killer sends
        return {
            "model": name,
            "scheme": scheme,
            "crash": "killed by SIGKILL (the OOM killer, on this machine)",
        }
    err = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    return {
        "model": name,
        "scheme": scheme,
        "crash": f"exit {res.returncode}: " + (err[-1] if err else "")[:200],
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*")
    ap.add_argument("--timeout", type=int, default=2400, help="seconds per model (ViT-H/14 takes ~15 min)")
    ap.add_argument("--scheme", default="onnxruntime_int8")
    ap.add_argument("--jobs", type=int, default=1, help="models run at once (one CPU thread each)")
    ap.add_argument(
        "--table-only", action="store_true", help="rewrite COVERAGE.md from coverage.jsonl, run nothing"
    )
    ap.add_argument(
        "--only",
        choices=["prune_channels"],
        help="run this stage alone (no reload/export), into coverage_exact.jsonl: the exactness rerun",
    )
    ap.add_argument("--max-params", type=float, default=None, help="skip models above this many M params")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.one, args.scheme, args.only)), flush=True)
        return 0
    import torchvision

    names = args.names or torchvision.models.list_models(module=torchvision.models)
    if args.max_params is not None and not args.names:  # sizes from the last full run's table
        known = {}
        for ln in (HERE / "COVERAGE.md").read_text().split(EXACT_HEADING)[0].splitlines():
            cells = [c.strip() for c in ln.split("|")]
            if len(cells) > 4 and cells[1] in names:
                known[cells[1]] = float(cells[3] or 0)
        names = [n for n in names if known.get(n, 0) <= args.max_params]
    jsonl = HERE / ("coverage_exact.jsonl" if args.only else "coverage.jsonl")
    done: dict[str, dict[str, Any]] = {}
    if jsonl.exists():
        for r in map(json.loads, jsonl.read_text().splitlines()):
            if r.get("scheme") == args.scheme:
                done[r["model"]] = r
    todo = [] if args.table_only else [n for n in names if args.names or n not in done]
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for row in pool.map(lambda n: run_one(n, args.scheme, args.timeout, args.only), todo):
            done[row["model"]] = row
            with jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    if args.only:  # the full table stays as its last full run left it; the section is replaced
        text = (HERE / "COVERAGE.md").read_text()
        text = text.split(EXACT_HEADING)[0].rstrip("\n").removesuffix("\n") + "\n"
        (HERE / "COVERAGE.md").write_text(text + exactness_section())
        return 0
    all_names = torchvision.models.list_models(module=torchvision.models)
    rows = [done.get(n, {"model": n, "scheme": args.scheme, "not_run": True}) for n in all_names]
    (HERE / "COVERAGE.md").write_text(table(rows, args.timeout, args.scheme))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
