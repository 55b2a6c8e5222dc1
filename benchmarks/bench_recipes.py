"""The issue-6/7 headline recipes, run through ``compress run`` and read back from report.json:

- recipes/fashion_deep_compression.yaml: >= 50x smaller checkpoint than the fp32 state_dict
  at <= 1.0 point drop;
- recipes/fashion_fast_cpu.yaml: >= 5x batch-1 latency and >= 8x batch-64 throughput against the fp32 original
  in torch eager, >= 2x / >= 3x against the original in the same runtime, at <= 1.0 point drop.

Every number printed comes from the run's report.json (the pipeline's own measurements). A recipe is run
only when its report is missing, or with ``--rerun``. Needs runs/fashion_train/model (``make fashion``).

    python benchmarks/bench_recipes.py [--rerun]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("fashion_deep_compression", "fashion_fast_cpu")


def report(name: str, rerun: bool) -> dict:
    path = ROOT / "runs" / name / "report.json"
    if rerun or not path.exists():
        cmd = [
            str(Path(sys.executable).with_name("compress")),
            "run",
            f"recipes/{name}.yaml",
            "--force",
            "--quiet",
        ]
        subprocess.run(cmd, cwd=ROOT, check=False)  # exit 3 (guard violated) still writes the report
    return json.loads(path.read_text())


def mark(ok: bool) -> str:
    return "met" if ok else "**not met**"


def main() -> int:
    rerun = "--rerun" in sys.argv
    lines = [
        "## Issues 6 and 7: the headline recipes",
        "",
        "Written by `benchmarks/bench_recipes.py` from each run's report.json (CPU, 1 measurement thread, "
        "Fashion-MNIST test set of 10 000 images; baseline `runs/fashion_train/model`, zoo:fashion_cnn).",
        "",
    ]
    for name in RECIPES:
        r = report(name, rerun)
        b, f = r["baseline"], r["stages"][-1]["metrics"]  # the targets are about what the recipe made
        drop = (b["accuracy"] - f["accuracy"]) * 100
        lines += [
            f"### {name}",
            "",
            f"Stages: {', '.join(s['name'] for s in r['stages'])}; {r['duration_s'] / 60:.0f} min wall.",
            "",
            "| stage | top-1 % | drop | nonzero params | size bytes | size × fp32 state_dict | b1 ms | b64 "
            "/s | runtime |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        rows = [("baseline", b)] + [(s["name"], s["metrics"]) for s in r["stages"]]
        for label, m in rows:
            lines.append(
                f"| {label} | {m['accuracy'] * 100:.2f} | {(b['accuracy'] - m['accuracy']) * 100:+.2f} | "
                f"{m['nonzero_params']:,} | {m['size_bytes']:,} | {b['fp32_bytes'] / m['size_bytes']:.1f} | "
                f"{m['latency_ms']:.3f} | {m['throughput']:.0f} | {m['runtime']} |"
            )
        lines.append("")
        if r["final"]["size_bytes"] != f["size_bytes"]:
            lines += [
                "A guard rejected the last stage's result: the run's output is the last result that met "
                "every "
                "guard (report.json `final`), not the row above.",
                "",
            ]
        if name == "fashion_deep_compression":
            ratio = b["fp32_bytes"] / f["size_bytes"]
            lines.append(
                f"Target ≥ 50× at ≤ 1.0 point: **{ratio:.1f}×** ({b['fp32_bytes']:,} → {f['size_bytes']:,} "
                "bytes) "
                f"at {drop:+.2f} points — size {mark(ratio >= 50)}, accuracy {mark(drop <= 1.0)}."
            )
        else:
            same = f.get("same_runtime_baseline") or r["final"].get("same_runtime_baseline") or {}
            s1, t64 = f["speedup"], f["throughput_ratio"]
            r1 = same["latency_ms"] / f["latency_ms"] if same else float("nan")
            r64 = f["throughput"] / same["throughput"] if same else float("nan")
            lines.append(
                f"Against the fp32 original in torch eager: batch-1 latency **{s1:.1f}×** (target 5×, "
                f"{mark(s1 >= 5)}), batch-64 throughput **{t64:.1f}×** (target 8×, {mark(t64 >= 8)}). "
                "Against the "
                f"original in the same runtime ({f['runtime']}): **{r1:.1f}×** / **{r64:.1f}×** (targets 2× "
                "/ 3×: "
                f"{mark(r1 >= 2)} / {mark(r64 >= 3)}). Drop {drop:+.2f} points ({mark(drop <= 1.0)})."
            )
        lines.append("")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
