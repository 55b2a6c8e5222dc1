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
    speedup_ci: list[float] | None = None
    speedup_unpaired: float | None = None
    throughput_ratio: float | None = None
    paired: list[dict[str, Any]] | None = None
    unstable: str | None = None
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
    machine: dict[str, Any] | None = None
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
    "speedup": "original / this model's time per call at latency_batch, measured paired: both timed "
    "alternately in the same window (rounds of calls), the median of the per-round ratios; "
    "speedup_ci is its bootstrap 95% interval, paired has each batch size's numbers",
    "speedup_unpaired": "baseline latency_ms / this latency_ms (measured apart: information only)",
    "throughput_ratio": "the paired ratio at throughput_batch",
    "unstable": "why a paired speedup is not to be trusted: its rounds spread too wide (p90/p50 over "
    "1.5), its interval wider than ±20%, or other processes kept the cores busy; guard.min_speedup "
    "then judges the interval's lower bound",
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
    ("speedup", lambda m: speedup_text(m)),
    ("samples/s", lambda m: f"{m.throughput:,.0f}" if m.throughput else "n/a"),
    ("runtime", lambda m: m.runtime),
]
HEADINGS = ["stage"] + [name for name, _ in COLUMNS]


def headings(report: Report) -> list[str]:
    """The table's headings: ``HEADINGS`` with the primary metric named (top-1 % for classification)."""
    return ["stage", score_label(report.baseline)] + HEADINGS[2:]


def ratio_text(ratio: float, ci: list[float] | None, unstable: str | None) -> str:
    """A paired ratio for people: ``3.21× [2.90-3.50]`` (median and 95% interval); an unstable one
    shows only its interval, ``0.90-412× unstable``, so no point value is printed that the timings
    do not support."""
    if unstable and ci:
        return f"{ci[0]:.2f}-{ci[1]:.2f}× unstable"
    if ci:
        return f"{ratio:.2f}× [{ci[0]:.2f}-{ci[1]:.2f}]"
    return f"{ratio:.2f}×"


def speedup_text(m: Metrics) -> str:
    """The speedup cell (:func:`ratio_text`; empty for the baseline)."""
    return ratio_text(m.speedup, m.speedup_ci, m.unstable) if m.speedup else ""


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


def budget_lines(b: dict[str, Any]) -> list[str]:
    """report.md lines of a quantize stage's accuracy budget (``details.budget``): the budget, the
    layers kept in float and every step's measurement and verdict."""
    out = [
        f"  - accuracy budget {b['max_accuracy_drop']} points of {b['metric']} on {b['samples']} "
        f"{b['split']} samples (fp32 {b['fp32_score']:.4f}): {b.get('why', '')}; "
        f"float: {', '.join(b.get('float_layers') or []) or 'none'}"
    ]
    for i, st in enumerate(b.get("steps", [])):
        fl = ", ".join(st["float_layers"]) or "none"
        if "drop" in st:
            verdict = "accepted" if st["accepted"] else "not accepted"
            out.append(
                f"    - step {i}, float [{fl}]: drop {st['drop']:.2f}, ~{st['latency_ms']:.3f} ms "
                f"at batch 1; {verdict} ({st['why']})"
            )
        else:
            out.append(f"    - step {i}, float [{fl}]: {st['why']}")
    return out


def candidate_table(rows: list[dict[str, Any]], primary: str, split: str | None = None) -> list[str]:
    """A stage's candidate table (``quantize`` with ``scheme: auto``) as markdown lines; ``split``:
    the split the scores and drops were measured on. A candidate that ran the per-layer fallback
    lists the layers it kept in float and its steps."""

    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    def kept(r: dict[str, Any]) -> str:
        if "fallback_steps" not in r:
            return "-"
        return f"{', '.join(r.get('float_layers') or []) or 'none'} ({r['fallback_steps']} step(s))"

    metric = f"{primary} ({split})" if split else primary
    out = [
        f"| scheme | runtime | {metric} | drop | float layers | latency ms | throughput/s | size | "
        "convert s | result |",
        "|" + "---|" * 10,
    ]
    for r in rows:
        out.append(
            f"| {r.get('scheme')} | {r.get('runtime')} | {f(r.get('score'), '.4f')} | "
            f"{f(r.get('drop'), '.2f')} | {kept(r)} | "
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
            if isinstance(s.details.get("budget"), dict):
                lines += budget_lines(s.details["budget"])
        if isinstance(s.details.get("candidates"), list) and s.details["candidates"]:
            lines += [
                "",
                *candidate_table(
                    s.details["candidates"],
                    str(s.details.get("primary", "score")),
                    s.details.get("split"),
                ),
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
    lines += paired_lines(report.final)
    lines += machine_lines(report.machine)
    lines += ["", "## What the numbers mean", ""]
    lines += [f"- `{k}`: {v}" for k, v in DEFINITIONS.items()]
    return "\n".join(lines) + "\n"


def paired_lines(final: Metrics | None) -> list[str]:
    """report.md's paired-speedup section: each batch size's original and final times, the ratio
    with its interval, and why a number is unstable."""
    if final is None or not final.paired:
        return []
    out = [
        "",
        "## Speedup, measured paired",
        "",
        "Original and final model timed alternately in the same window; the ratio is the median of "
        "the per-round ratios, with its bootstrap 95% interval.",
        "",
        "| batch | original ms p50 / p90 | final ms p50 / p90 | speedup [95% interval] | rounds × calls | |",
        "|---|---|---|---|---|---|",
    ]
    for p in final.paired:
        ci = p["ci"]
        flag = f"**unstable**: {p['unstable']}" if p.get("unstable") else "stable"
        out.append(
            f"| {p['batch']} | {p['a_ms_p50']:.3f} / {p['a_ms_p90']:.3f} | {p['b_ms_p50']:.3f} / "
            f"{p['b_ms_p90']:.3f} | {ratio_text(p['ratio'], ci, p.get('unstable'))} | "
            f"{p['rounds']} × {p['calls']} | {flag} |"
        )
    if final.speedup_unpaired:
        out += ["", f"Unpaired (baseline and final measured apart): {final.speedup_unpaired:.2f}×."]
    return out


def machine_lines(machine: dict[str, Any] | None) -> list[str]:
    """report.md's machine section: CPU, flags, cores and threads, load, GPU, library versions."""
    if not machine:
        return []
    out = ["", "## Machine", ""]
    for k, v in machine.items():
        if v is None or v == [] or v == {}:
            continue
        if isinstance(v, dict):
            v = ", ".join(f"{a} {b}" for a, b in v.items())
        elif isinstance(v, list):
            v = " ".join(str(x) for x in v)
        out.append(f"- {k.replace('_', ' ')}: {v}")
    return out


def write_plot(report: Report, path: Path) -> None:
    """report.png: accuracy against checkpoint size and against latency, one point per row."""
    import matplotlib.pyplot as plt

    fig = report_figure(report)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=fig.dpi)
    plt.close(fig)
    tmp.replace(path)


def report_figure(report: Report) -> Any:
    """The figure of report.png (Agg backend; the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert report.baseline is not None
    items = [("baseline", report.baseline)] + [(f"{s.index}.{s.type}", s.metrics) for s in report.stages]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    labels: list[list[tuple[float, float, str]]] = [[], []]
    for label, m in items:
        acc = m.primary_score()[1] * (100 if m.primary is None else 1)
        kib = (m.size_bytes or 0) / 1024
        axes[0].scatter(kib, acc, s=40)
        labels[0].append((kib, acc, label))
        if m.latency_ms:
            # an unstable speedup: a hollow marker (its timings are not to be trusted)
            hollow = {"facecolors": "none", "edgecolors": "C3"} if m.unstable else {}
            axes[1].scatter(m.latency_ms, acc, s=40, **hollow)
            labels[1].append((m.latency_ms, acc, label))
    log_axis(axes[0], "x")
    axes[0].set_xlabel("checkpoint size on disk (KiB, log)")
    log_axis(axes[1], "x")
    axes[1].set_xlabel("latency, batch 1 (ms, log); hollow: unstable timing")
    for ax in axes:
        ax.set_ylabel("top-1 accuracy (%)" if report.baseline.primary is None else report.baseline.primary)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{report.recipe}: accuracy vs size and latency per stage")
    fig.tight_layout()
    for ax, points in zip(axes, labels, strict=True):
        place_labels(ax, points)
    return fig


def log_axis(ax: Any, which: str) -> None:
    """A log scale on ``ax``'s ``which`` axis ("x"/"y") with plain-number ticks at 1-2-5 steps
    (``0.05``, ``20``, ``500``: no ``10^x`` notation), and a few more when the data spans little."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(plain)
    axis.set_minor_locator(LogLocator(base=10, subs=(1.5, 3.0, 4.0, 6.0, 7.0, 8.0, 9.0)))
    lo, hi = ax.get_xlim() if which == "x" else ax.get_ylim()
    # within a factor of 4 a 1-2-5 grid may put one tick on the axis: label the minor ticks too
    axis.set_minor_formatter(plain if hi / max(lo, 1e-30) < 4 else NullFormatter())


#: candidate label offsets from a point, in typographic points: near first, then in rings further out
_OFFSETS = [
    (r * dx, r * dy)
    for r in (5, 14, 24, 36, 50, 66, 84)
    for dx, dy in ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))
]


def place_labels(ax: Any, points: list[tuple[float, float, str]], fontsize: float = 8) -> list[Any]:
    """Annotate ``(x, y, text)`` points on ``ax`` so that no two labels overlap (nor cover a point's
    marker): each label takes the nearest free spot of :data:`_OFFSETS`, inside the axes if one is
    free there, measured with the figure's renderer, with a thin line back to its point when it sits
    away from it. Call it once the layout is final (after ``tight_layout``): the offsets are in
    points on the drawn figure. Returns the annotations."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    fig = ax.figure
    ax.set_xlim(ax.get_xlim())  # freeze the limits: an annotation must not rescale the axes
    ax.set_ylim(ax.get_ylim())
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    pad = fontsize * fig.dpi / 72 * 0.6  # about a marker's half-size, in pixels
    taken = []
    for x, y in {(x, y) for x, y, _ in points}:
        px, py = ax.transData.transform((x, y))
        taken.append(Bbox.from_extents(px - pad, py - pad, px + pad, py + pad))

    def inside(b: Any) -> bool:
        return bool(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1)

    out = []
    for x, y, text in points:
        for need_inside in (True, False):
            for dx, dy in _OFFSETS:
                far = abs(dx) + abs(dy) > 12
                ann = ax.annotate(
                    text,
                    (x, y),
                    xytext=(dx, dy),
                    textcoords="offset points",
                    fontsize=fontsize,
                    ha="left" if dx > 0 else "right" if dx < 0 else "center",
                    va="bottom" if dy > 0 else "top" if dy < 0 else "center",
                    annotation_clip=False,
                    arrowprops={"arrowstyle": "-", "color": "0.55", "lw": 0.6, "shrinkA": 0, "shrinkB": 3}
                    if far
                    else None,
                )
                ann.update_positions(renderer)
                box = Text.get_window_extent(ann, renderer)  # the text alone, not its line
                if (inside(box) or not need_inside) and not any(box.overlaps(t) for t in taken):
                    taken.append(box)
                    out.append(ann)
                    break
                ann.remove()
            else:
                continue
            break
    return out


def write_report(report: Report, out: Path) -> None:
    """OUT/report.json, report.md and report.png, each written atomically."""
    atomic_write_text(out / "report.json", json.dumps(report.to_dict(), indent=2, default=_json_default))
    atomic_write_text(out / "report.md", to_markdown(report))
    write_plot(report, out / "report.png")


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    return str(o)
