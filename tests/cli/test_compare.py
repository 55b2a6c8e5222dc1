"""``compress compare``: one row per run (its final result), Pareto flags, compare.md/png with
labels that do not overlap, ``--json``; a directory without report.json is a usage error."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from typer.testing import CliRunner

from compress_cli.cli import app
from compress_cli.cli.compare import compare_figure, compare_rows, pareto
from compress_cli.report import Metrics, Report, StageEntry
from compress_cli.testing import fake_metrics


def _run(tmp_path: Path, name: str, final: Metrics, recipe: str | None = None) -> Path:
    base = fake_metrics(0.90, 80_000, 0.10)
    entry = StageEntry(
        index=1, name="q", type="quantize", duration_s=1, metrics=final, notes="", details={}, artifacts=[]
    )
    report = Report(
        recipe=recipe or name,
        tool_version="0",
        device="cpu",
        seed=0,
        output=name,
        stages=[entry],
        baseline=base,
        final=final,
    )
    d = tmp_path / name
    d.mkdir()
    (d / "report.json").write_text(json.dumps(report.to_dict()))
    return d


def _runs(tmp_path: Path) -> list[Path]:
    return [
        _run(tmp_path, "int8", fake_metrics(0.895, 20_000, 0.05, accuracy_drop=0.5, size_ratio=4, speedup=2)),
        _run(
            tmp_path, "ort", fake_metrics(0.895, 20_000, 0.05, runtime="onnxruntime", accuracy_drop=0.5)
        ),  # same point
        _run(tmp_path, "pruned", fake_metrics(0.899, 40_000, 0.07, accuracy_drop=0.1)),
        _run(tmp_path, "worse", fake_metrics(0.85, 50_000, 0.08, accuracy_drop=5.0)),
    ]


def test_rows_are_final_results_with_pareto_flags(tmp_path):
    rows = compare_rows(_runs(tmp_path))
    assert [r["run"] for r in rows] == ["int8", "ort", "pruned", "worse"]
    assert rows[0]["value"] == 89.5 and rows[0]["size_ratio"] == 4.0 and rows[0]["speedup"] == 2.0
    assert rows[1]["runtime"] == "onnxruntime"
    assert [r["pareto"] for r in rows] == [["size", "latency"], ["size", "latency"], ["size", "latency"], []]
    assert pareto([(1.0, 2.0), (1.0, 1.0), None, (0.5, 0.5)]) == [False, True, False, True]


def test_compare_writes_table_and_plot_and_prints_json(tmp_path):
    dirs = _runs(tmp_path)
    res = CliRunner().invoke(app, ["compare", *map(str, dirs), "--out", str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output
    assert "pruned" in res.output and "compare.png" in res.output
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert (
        "| int8 | top-1 % | 89.50 | +0.50 | 19.5 KB | 4.0 | 0.050 | 2.00× | torch-eager | size, latency |"
        in md
    )
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
    res = CliRunner().invoke(app, ["compare", *map(str, dirs[:2]), "--out", str(tmp_path / "c2"), "--json"])
    doc = json.loads(res.stdout)
    assert [r["run"] for r in doc["runs"]] == ["int8", "ort"] and doc["runs"][0]["size_bytes"] == 20_000
    assert not any(k.endswith("_text") for k in doc["runs"][0])


def test_compare_plot_labels_do_not_overlap(tmp_path):
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    dirs = _runs(tmp_path)
    fig = compare_figure(dirs, compare_rows(dirs))
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            boxes = [Text.get_window_extent(t, renderer) for t in ax.texts]
            assert len(boxes) == 4  # one label per run, two of them on one point
            assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
    finally:
        plt.close(fig)


def test_same_recipe_twice_is_told_apart_and_missing_report_is_refused(tmp_path):
    a = _run(tmp_path, "a", fake_metrics(0.9, 1000, 0.1), recipe="r")
    b = _run(tmp_path, "b", fake_metrics(0.9, 1000, 0.1), recipe="r")
    assert [r["run"] for r in compare_rows([a, b])] == ["r (a)", "r (b)"]
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(app, ["compare", str(a), str(tmp_path / "empty"), "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "empty: no report.json" in res.output
