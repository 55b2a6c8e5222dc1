"""Report: report.json (machine-readable contract), report.md and report.png for people."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compress_cli._utils.io import atomic_write_text

DEFINITIONS = {
    "accuracy": "top-1 accuracy on the held-out split, fraction 0..1",
    "top5": "top-5 accuracy (only with more than 5 classes)",
    "loss": "mean cross-entropy on the held-out split",
    "params": "floating-point parameters (batch-norm running stats excluded)",
    "nonzero_params": "parameters that are not exactly zero",
    "size_bytes": "bytes on disk of the compressed checkpoint (manifest + encoded weights)",
    "size_ratio": "fp32 state_dict saved with torch.save (baseline fp32_bytes) / size_bytes",
    "macs": "multiply-accumulates of one forward pass at batch 1 (torch.utils.flop_counter / 2)",
    "latency_ms": "median wall time of one forward pass at latency_batch, after warm-up, on the run device, in the named runtime",
    "latency_p90_ms": "90th percentile of the same",
    "throughput": "samples per second at throughput_batch (median over repeats)",
    "speedup": "baseline latency_ms / this latency_ms",
    "accuracy_drop": "baseline accuracy - this accuracy, in percentage points",
    "runtime": "what executed the model for these numbers (torch-eager, torch-compiled, onnxruntime)",
}

COLUMNS = [
    ("stage", None),
    ("top-1 %", lambda m: f"{m['accuracy'] * 100:.2f}"),
    ("drop", lambda m: "" if m.get("accuracy_drop") is None else f"{m['accuracy_drop']:+.2f}"),
    ("params", lambda m: f"{m['params']:,}"),
    ("sparsity", lambda m: f"{m['sparsity'] * 100:.1f}%"),
    ("size", lambda m: human_bytes(m["size_bytes"])),
    ("size ×", lambda m: f"{m['size_ratio']:.1f}" if m.get("size_ratio") else ""),
    ("MACs", lambda m: f"{m['macs'] / 1e6:.2f}M" if m.get("macs") else "n/a"),
    ("latency ms", lambda m: f"{m['latency_ms']:.3f}" if m.get("latency_ms") else "n/a"),
    ("speedup", lambda m: f"{m['speedup']:.2f}×" if m.get("speedup") else ""),
    ("samples/s", lambda m: f"{m['throughput']:,.0f}" if m.get("throughput") else "n/a"),
    ("runtime", lambda m: m.get("runtime", "")),
]


def human_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    f = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if f < 1024 or unit == "GB":
            return f"{f:.0f} {unit}" if unit == "B" else f"{f:.1f} {unit}"
        f /= 1024
    return f"{f:.1f} GB"


def rows(report: dict[str, Any]) -> list[list[str]]:
    out = []
    items = [("baseline", report["baseline"])] + [
        (f"{s['index']}. {s['name']}", s["metrics"]) for s in report["stages"]
    ]
    for label, m in items:
        out.append([label] + [fn(m) for _, fn in COLUMNS[1:]])  # type: ignore[misc]
    return out


def to_markdown(report: dict[str, Any]) -> str:
    head = [c for c, _ in COLUMNS]
    lines = [f"# compress report: {report['recipe']}", ""]
    if report.get("incomplete"):
        lines += [f"**Incomplete run**: {report.get('error')}", ""]
    lines += [
        f"Device: `{report['device']}` · seed {report['seed']} · total {report.get('duration_s', 0):.1f} s",
        "",
    ]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in rows(report):
        lines.append("| " + " | ".join(r) + " |")
    lines.append("")
    for s in report["stages"]:
        if s.get("notes") or s.get("guard_violations"):
            lines.append(f"- **{s['index']}. {s['name']}** ({s['duration_s']:.1f} s): {s.get('notes', '')}")
            for v in s.get("guard_violations", []):
                lines.append(f"  - guard violated: {v}")
    final = report.get("final") or {}
    srb = final.get("same_runtime_baseline")
    if srb:
        lines += [
            "",
            f"Original model in the final runtime ({final.get('runtime')}): "
            f"latency {srb.get('latency_ms', 0):.3f} ms, throughput {srb.get('throughput', 0):,.0f}/s.",
        ]
    lines += ["", "## What the numbers mean", ""]
    lines += [f"- `{k}`: {v}" for k, v in DEFINITIONS.items()]
    return "\n".join(lines) + "\n"


def write_plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [("baseline", report["baseline"])] + [
        (f"{s['index']}.{s['type']}", s["metrics"]) for s in report["stages"]
    ]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, m in items:
        acc = m["accuracy"] * 100
        axes[0].scatter(m["size_bytes"] / 1024, acc, s=40)
        axes[0].annotate(
            label, (m["size_bytes"] / 1024, acc), fontsize=8, xytext=(3, 3), textcoords="offset points"
        )
        if m.get("latency_ms"):
            axes[1].scatter(m["latency_ms"], acc, s=40)
            axes[1].annotate(
                label, (m["latency_ms"], acc), fontsize=8, xytext=(3, 3), textcoords="offset points"
            )
    axes[0].set_xscale("log")
    axes[0].set_xlabel("checkpoint size on disk (KiB, log)")
    axes[1].set_xlabel("latency, batch 1 (ms)")
    for ax in axes:
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{report['recipe']}: accuracy vs size and latency per stage")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_report(report: dict[str, Any], out: Path) -> None:
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=_json_default))
    atomic_write_text(out / "report.md", to_markdown(report))
    write_plot(report, out / "report.png")


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    return str(o)
