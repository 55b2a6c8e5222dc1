"""``compress compare RUN_DIR...``: the final result of several runs side by side.

Each run directory's report.json gives one row (its final metrics: the primary metric, its drop,
checkpoint size and ratio, latency and speedup, the runtime), and the runs' measured points give
one series each on a Pareto plot (primary metric against size and against latency). The rows say
which runs are on the Pareto front of each plot: no other run is at least as good on the metric and
at least as small (or fast), and better on one of the two.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compress_cli.errors import UsageError
from compress_cli.report import Metrics, Report, drop_text, human_bytes, score_label, score_text

#: the table's columns: (heading, key of a row)
COLUMNS = [
    ("run", "run"),
    ("metric", "metric"),
    ("value", "value_text"),
    ("drop", "drop_text"),
    ("size", "size_text"),
    ("size ×", "size_ratio_text"),
    ("latency ms", "latency_text"),
    ("speedup", "speedup_text"),
    ("runtime", "runtime"),
    ("Pareto", "pareto_text"),
]


def load_report(run_dir: Path) -> Report:
    """The report.json of ``run_dir``; a missing or unreadable one is a :class:`UsageError`."""
    path = run_dir / "report.json"
    if not path.is_file():
        raise UsageError(
            f"{run_dir}: no report.json (not a run directory, or its run has not written a report yet)"
        )
    try:
        return Report.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:  # pydantic's ValidationError is a ValueError
        first = str(e).strip().splitlines()[0]
        raise UsageError(f"{path}: not a report.json this version reads ({first})") from None


def _final(report: Report) -> Metrics:
    if report.final is not None:
        return report.final
    if report.stages:
        return report.stages[-1].metrics
    if report.baseline is None:
        raise UsageError(f"{report.output}: report.json has no measurement")
    return report.baseline


def _value(m: Metrics) -> float:
    """The primary metric as plotted: top-1 in percent, else the task's own value."""
    return m.primary_score()[1] * (100 if m.primary is None else 1)


def _names(reports: list[tuple[Path, Report]]) -> list[str]:
    """Each run's name: its recipe's, or its directory's where two runs share a recipe name."""
    recipes = [r.recipe for _, r in reports]
    return [r.recipe if recipes.count(r.recipe) == 1 else f"{r.recipe} ({d.name})" for d, r in reports]


def pareto(points: list[tuple[float, float] | None]) -> list[bool]:
    """For (value, cost) points (higher value, lower cost better; None: not comparable), whether
    each is on the Pareto front: no other point is as good on both and better on one."""
    out = []
    for i, p in enumerate(points):
        if p is None:
            out.append(False)
            continue
        v, c = p
        dominated = any(
            q is not None and j != i and q[0] >= v and q[1] <= c and (q[0] > v or q[1] < c)
            for j, q in enumerate(points)
        )
        out.append(not dominated)
    return out


def compare_rows(run_dirs: list[Path]) -> list[dict[str, Any]]:
    """One row per run (its final metrics), in the order given, with the Pareto flags."""
    reports = [(d, load_report(d)) for d in run_dirs]
    finals = [_final(r) for _, r in reports]
    metrics = [score_label(m) for m in finals]
    same_metric = len(set(metrics)) == 1  # a front across different metrics means nothing
    by_size = pareto(
        [(_value(m), float(m.size_bytes)) if same_metric and m.size_bytes else None for m in finals]
    )
    by_latency = pareto(
        [(_value(m), float(m.latency_ms)) if same_metric and m.latency_ms else None for m in finals]
    )
    rows = []
    for (d, r), name, m, metric, ps, pl in zip(
        reports, _names(reports), finals, metrics, by_size, by_latency, strict=True
    ):
        front = [w for w, on in (("size", ps), ("latency", pl)) if on]
        rows.append(
            {
                "run": name,
                "dir": str(d),
                "recipe": r.recipe,
                "metric": metric,
                "value": _value(m),
                "drop": m.accuracy_drop if m.primary is None else m.metric_drop,
                "size_bytes": m.size_bytes,
                "size_ratio": m.size_ratio,
                "latency_ms": m.latency_ms,
                "speedup": m.speedup,
                "runtime": m.runtime + (" (incomplete)" if r.incomplete else ""),
                "pareto": front,
                "value_text": score_text(m),
                "drop_text": drop_text(m),
                "size_text": human_bytes(m.size_bytes),
                "size_ratio_text": f"{m.size_ratio:.1f}" if m.size_ratio else "",
                "latency_text": f"{m.latency_ms:.3f}" if m.latency_ms else "n/a",
                "speedup_text": f"{m.speedup:.2f}×" if m.speedup else "",
                "pareto_text": ", ".join(front),
            }
        )
    return rows


def public_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows as ``--json`` prints them: numbers, not the table's text cells."""
    return [{k: v for k, v in r.items() if not k.endswith("_text")} for r in rows]


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """compare.md: the table, and what its columns mean."""
    lines = ["# compress compare", ""]
    lines.append("| " + " | ".join(h for h, _ in COLUMNS) + " |")
    lines.append("|" + "---|" * len(COLUMNS))
    for r in rows:
        lines.append("| " + " | ".join(str(r[k]) for _, k in COLUMNS) + " |")
    lines += [
        "",
        "Each row is the run's final result (report.json `final`). `drop`: against that run's own "
        "baseline; `size ×`: fp32 state_dict bytes / checkpoint bytes; `speedup`: baseline latency / "
        "latency, both in the run; `Pareto`: no other run here has at least the same metric with a "
        "smaller checkpoint (size) or lower latency (latency), better on one of the two.",
        "",
        "| run | directory |",
        "|---|---|",
        *[f"| {r['run']} | `{r['dir']}` |" for r in rows],
    ]
    return "\n".join(lines) + "\n"


def compare_figure(run_dirs: list[Path], rows: list[dict[str, Any]]) -> Any:
    """The Pareto plot: the primary metric against size and against latency, one series per run
    (baseline -> each stage, the final point larger), labels that do not overlap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from compress_cli.report import log_axis, place_labels

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), dpi=110)
    labels: list[list[tuple[float, float, str]]] = [[], []]
    for i, (d, row) in enumerate(zip(run_dirs, rows, strict=True)):
        report = load_report(d)
        color = f"C{i % 10}"
        measured = report.measured() if report.baseline is not None else []
        final = _final(report)
        for ax, key, cell in ((axes[0], "size", 0), (axes[1], "latency", 1)):
            xs, ys = [], []
            for _, m in measured:
                x = (m.size_bytes or 0) / 1024 if key == "size" else m.latency_ms
                if x:
                    xs.append(x)
                    ys.append(_value(m))
            fx = (final.size_bytes or 0) / 1024 if key == "size" else final.latency_ms
            ax.plot(xs, ys, "-o", color=color, ms=3, lw=1, alpha=0.6, label=row["run"])
            if fx:
                ax.scatter([fx], [_value(final)], s=70, color=color, edgecolor="black", zorder=3)
                labels[cell].append((fx, _value(final), row["run"]))
    for ax, key in ((axes[0], "size"), (axes[1], "latency")):
        cost = "size_bytes" if key == "size" else "latency_ms"
        scale = 1024 if key == "size" else 1
        front = sorted((r[cost] / scale, r["value"]) for r in rows if key in r["pareto"])
        if len(front) > 1:
            ax.plot(*zip(*front, strict=True), "--", color="0.5", lw=1, zorder=1, label="Pareto front")
        log_axis(ax, "x")
        ax.set_ylabel(rows[0]["metric"] if rows else "")
        ax.grid(alpha=0.3)
    axes[0].set_xlabel("checkpoint size on disk (KiB, log)")
    axes[1].set_xlabel("latency, batch 1 (ms, log)")
    axes[1].legend(fontsize=7, loc="best")
    if not labels[1]:
        axes[1].text(0.5, 0.5, "no latency measured in these runs", ha="center", transform=axes[1].transAxes)
    fig.suptitle("compress compare: final result per run (large marker), its stages along the line")
    fig.tight_layout()
    for ax, points in zip(axes, labels, strict=True):
        place_labels(ax, points)
    return fig


def write_compare(run_dirs: list[Path], out: Path) -> tuple[list[dict[str, Any]], list[Path]]:
    """Compare ``run_dirs``; write OUT/compare.md and OUT/compare.png -> (rows, files written)."""
    import matplotlib.pyplot as plt

    from compress_cli._utils.io import atomic_write_text

    if not run_dirs:
        raise UsageError("compare: name at least one run directory")
    rows = compare_rows(run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    md, png = out / "compare.md", out / "compare.png"
    atomic_write_text(md, to_markdown(rows))
    fig = compare_figure(run_dirs, rows)
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=fig.dpi)
    plt.close(fig)
    tmp.replace(png)
    return rows, [md, png]
