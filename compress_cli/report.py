"""Report: the typed report models, and report.json (machine-readable contract), report.md and
report.png for people.

The models serialise exactly as the dicts they replace did: a key appears in report.json when it
was set (``exclude_unset``), in the order the fields are declared here, so report.json keeps its
shape (``tests/engine/test_report_shape.py`` compares it with a committed one).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from compress_cli._utils.io import atomic_write_text


class _Model(BaseModel):
    # mutable: the engine fills a report in as the run goes (stages, final, guard ...)
    model_config = ConfigDict(extra="forbid")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: the fields that were set, in declaration order."""
        return self.model_dump(mode="python", exclude_unset=True)


class Metrics(_Model):
    """Every number measured after a stage (``runtime.measure.measure_all``); see ``DEFINITIONS``.

    Keys a runner describes beyond the declared ones are kept (``extra="allow"``)."""

    model_config = ConfigDict(extra="allow")

    # classification (the default task) reports these three, flat, as it always has
    accuracy: float | None = None
    loss: float | None = None
    samples: int
    top5: float | None = None
    # any other task: its name, primary metric and direction, every metric, the primary's value
    task: str | None = None
    primary: str | None = None
    higher_is_better: bool | None = None
    scores: dict[str, float] | None = None
    score: float | None = None
    params: int
    nonzero_params: int
    sparsity: float
    size_bytes: int | None = None
    macs: int | None = None
    latency_ms: float | None = None
    latency_p90_ms: float | None = None
    latency_batch: int | None = None
    throughput: float | None = None
    throughput_batch: int | None = None
    threads: int | None = None
    runtime: str
    device: str
    compile: str | None = None
    provider: str | None = None
    onnxruntime: str | None = None
    accuracy_drop: float | None = None
    metric_drop: float | None = None
    fp32_bytes: int | None = None
    size_ratio: float | None = None
    speedup: float | None = None
    throughput_ratio: float | None = None
    guard_violations: list[str] | None = None
    result_from_stage: int | None = None
    same_runtime_baseline: dict[str, Any] | None = None

    def primary_score(self) -> tuple[str, float, bool]:
        """(name, value, higher is better) of the metric guards and searches rank by: the task's
        primary metric, or top-1 accuracy for classification."""
        if self.primary is not None and self.score is not None:
            return self.primary, self.score, bool(self.higher_is_better)
        if self.accuracy is None:
            raise ValueError("these metrics have neither a task score nor an accuracy")
        return "accuracy", self.accuracy, True

    def drop_from(self, reference: Metrics) -> float:
        """How much worse the primary metric is than ``reference``'s, in the metric's own units
        (positive: worse; the direction is the metric's)."""
        _, value, higher = self.primary_score()
        _, ref, _ = reference.primary_score()
        return round((ref - value) if higher else (value - ref), 6)


class StageEntry(_Model):
    """One stage's line in the report: what ran, how long, what it measured and said."""

    index: int
    name: str
    type: str
    duration_s: float
    metrics: Metrics
    notes: str
    details: dict[str, Any]
    artifacts: list[str]
    guard_violations: list[str] | None = None
    on_violation: str | None = None
    rejected_metrics: Metrics | None = None  # after a revert: what the rejected model measured
    reverted: bool | None = None


class Report(_Model):
    """report.json: the run, the baseline, one entry per stage, the final result and the guard."""

    recipe: str
    tool_version: str
    device: str
    seed: int
    output: str
    stages: list[StageEntry]
    resumed_after_stage: int | None = None
    baseline: Metrics | None = None
    skipped: list[str] | None = None
    stopped_early: str | None = None
    reverted_to: int | None = None
    final: Metrics | None = None
    hparams: dict[str, Any] | None = None
    edits: list[dict[str, Any]] | None = None
    guard: dict[str, Any] | None = None
    duration_s: float | None = None
    error: str | None = None  # an incomplete run: why it stopped
    incomplete: bool | None = None

    def measured(self) -> list[tuple[str, Metrics]]:
        """(label, metrics) for the baseline and each stage, in order (the table's rows)."""
        assert self.baseline is not None
        return [("baseline", self.baseline)] + [(f"{s.index}. {s.name}", s.metrics) for s in self.stages]


DEFINITIONS = {
    "accuracy": "top-1 accuracy on the held-out split, fraction 0..1",
    "top5": "top-5 accuracy (only with more than 5 classes)",
    "loss": "mean cross-entropy on the held-out split",
    "params": "floating-point parameters (batch-norm running stats excluded)",
    "nonzero_params": "parameters that are not exactly zero",
    "size_bytes": "bytes on disk of the compressed checkpoint (manifest + encoded weights)",
    "size_ratio": "fp32 state_dict saved with torch.save (baseline fp32_bytes) / size_bytes",
    "macs": "multiply-accumulates of one forward pass at batch 1 (torch.utils.flop_counter / 2)",
    "latency_ms": "median wall time of one forward pass at latency_batch, after warm-up, on the run device, "
    "in the named runtime",
    "latency_p90_ms": "90th percentile of the same",
    "throughput": "samples per second at throughput_batch (median over repeats)",
    "speedup": "baseline latency_ms / this latency_ms",
    "accuracy_drop": "baseline accuracy - this accuracy, in percentage points",
    "score": "other tasks: the value of the task's primary metric (named in the table's heading)",
    "metric_drop": "other tasks: how much worse the primary metric is than the baseline's, in its units",
    "runtime": "what executed the model for these numbers (torch-eager, torch-compiled, onnxruntime)",
}


def score_text(m: Metrics) -> str:
    """The primary metric's cell: top-1 in percent for classification, else the task's value."""
    if m.primary is None or m.score is None:
        return f"{m.accuracy * 100:.2f}" if m.accuracy is not None else "n/a"
    return f"{m.score:.4f}"


def drop_text(m: Metrics) -> str:
    """The drop against the baseline: points of top-1, else the primary metric's own units."""
    if m.primary is None:
        return "" if m.accuracy_drop is None else f"{m.accuracy_drop:+.2f}"
    return "" if m.metric_drop is None else f"{m.metric_drop:+.4f}"


def score_label(m: Metrics | None) -> str:
    """What the primary metric is called in tables and plots."""
    return "top-1 %" if m is None or m.primary is None else m.primary


#: the table's columns after "stage" and the primary metric: (heading, cell of one row's metrics)
COLUMNS: list[tuple[str, Callable[[Metrics], str]]] = [
    ("score", score_text),
    ("drop", drop_text),
    ("params", lambda m: f"{m.params:,}"),
    ("sparsity", lambda m: f"{m.sparsity * 100:.1f}%"),
    ("size", lambda m: human_bytes(m.size_bytes)),
    ("size ×", lambda m: f"{m.size_ratio:.1f}" if m.size_ratio else ""),
    ("MACs", lambda m: f"{m.macs / 1e6:.2f}M" if m.macs else "n/a"),
    ("latency ms", lambda m: f"{m.latency_ms:.3f}" if m.latency_ms else "n/a"),
    ("speedup", lambda m: f"{m.speedup:.2f}×" if m.speedup else ""),
    ("samples/s", lambda m: f"{m.throughput:,.0f}" if m.throughput else "n/a"),
    ("runtime", lambda m: m.runtime),
]
HEADINGS = ["stage"] + [name for name, _ in COLUMNS]


def headings(report: Report) -> list[str]:
    """The table's headings: ``HEADINGS`` with the primary metric named (top-1 % for classification)."""
    return ["stage", score_label(report.baseline)] + HEADINGS[2:]


def human_bytes(n: int | None) -> str:
    """``n`` bytes for people: ``512 B``, ``25.3 KB``, ``1.2 GB``."""
    if n is None:
        return "n/a"
    f = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if f < 1024 or unit == "GB":
            return f"{f:.0f} {unit}" if unit == "B" else f"{f:.1f} {unit}"
        f /= 1024
    return f"{f:.1f} GB"


def rows(report: Report) -> list[list[str]]:
    """The table's rows (baseline, then each stage) as strings, in ``HEADINGS`` order."""
    return [[label] + [cell(m) for _, cell in COLUMNS] for label, m in report.measured()]


def candidate_table(rows: list[dict[str, Any]], primary: str) -> list[str]:
    """A stage's candidate table (``quantize`` with ``scheme: auto``) as markdown lines."""

    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    out = [
        f"| scheme | runtime | {primary} | drop | latency ms | throughput/s | size | convert s | result |",
        "|" + "---|" * 9,
    ]
    for r in rows:
        out.append(
            f"| {r.get('scheme')} | {r.get('runtime')} | {f(r.get('score'), '.4f')} | "
            f"{f(r.get('drop'), '.2f')} | "
            f"{f(r.get('latency_ms'), '.3f')} | {f(r.get('throughput'), ',.0f')} | "
            f"{human_bytes(r.get('size_bytes'))} | {f(r.get('convert_s'), '.1f')} | {r.get('status', '')} |"
        )
    return out


def to_markdown(report: Report) -> str:
    """report.md: the table, each stage's notes and guard violations, and what the numbers mean."""
    lines = [f"# compress report: {report.recipe}", ""]
    if report.incomplete:
        lines += [f"**Incomplete run**: {report.error}", ""]
    lines += [
        f"Device: `{report.device}` · seed {report.seed} · total {report.duration_s or 0:.1f} s",
        "",
    ]
    lines.append("| " + " | ".join(headings(report)) + " |")
    lines.append("|" + "---|" * len(HEADINGS))
    for r in rows(report):
        lines.append("| " + " | ".join(r) + " |")
    lines.append("")
    for s in report.stages:
        if s.notes or s.guard_violations:
            lines.append(f"- **{s.index}. {s.name}** ({s.duration_s:.1f} s): {s.notes}")
            for v in s.guard_violations or []:
                lines.append(f"  - guard violated: {v}")
        if isinstance(s.details.get("candidates"), list) and s.details["candidates"]:
            lines += [
                "",
                *candidate_table(s.details["candidates"], str(s.details.get("primary", "score"))),
                "",
            ]
    srb = report.final.same_runtime_baseline if report.final is not None else None
    if srb:
        assert report.final is not None
        lines += [
            "",
            f"Original model in the final runtime ({report.final.runtime}): "
            f"latency {srb.get('latency_ms', 0):.3f} ms, throughput {srb.get('throughput', 0):,.0f}/s.",
        ]
    lines += ["", "## What the numbers mean", ""]
    lines += [f"- `{k}`: {v}" for k, v in DEFINITIONS.items()]
    return "\n".join(lines) + "\n"


def write_plot(report: Report, path: Path) -> None:
    """report.png: accuracy against checkpoint size and against latency, one point per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert report.baseline is not None
    items = [("baseline", report.baseline)] + [(f"{s.index}.{s.type}", s.metrics) for s in report.stages]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, m in items:
        acc = m.primary_score()[1] * (100 if m.primary is None else 1)
        kib = (m.size_bytes or 0) / 1024
        axes[0].scatter(kib, acc, s=40)
        axes[0].annotate(label, (kib, acc), fontsize=8, xytext=(3, 3), textcoords="offset points")
        if m.latency_ms:
            axes[1].scatter(m.latency_ms, acc, s=40)
            axes[1].annotate(
                label, (m.latency_ms, acc), fontsize=8, xytext=(3, 3), textcoords="offset points"
            )
    axes[0].set_xscale("log")
    axes[0].set_xlabel("checkpoint size on disk (KiB, log)")
    axes[1].set_xlabel("latency, batch 1 (ms)")
    for ax in axes:
        ax.set_ylabel("top-1 accuracy (%)" if report.baseline.primary is None else report.baseline.primary)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{report.recipe}: accuracy vs size and latency per stage")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_report(report: Report, out: Path) -> None:
    """OUT/report.json, report.md and report.png, each written atomically."""
    atomic_write_text(out / "report.json", json.dumps(report.to_dict(), indent=2, default=_json_default))
    atomic_write_text(out / "report.md", to_markdown(report))
    write_plot(report, out / "report.png")


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    return str(o)
