"""report.png's labels never overlap, even where two stages share a point (quantize then evaluate
measure the same model), and its log axes have plain-number ticks."""

from __future__ import annotations

import itertools

from compress_cli.report import Report, StageEntry, place_labels, report_figure
from compress_cli.testing import fake_metrics


def _report() -> Report:
    same = fake_metrics(0.91, 15_000, 0.05)
    stages = [
        ("finetune", fake_metrics(0.93, 60_000, 0.09)),
        ("prune", fake_metrics(0.92, 30_000, 0.088)),
        ("quantize", same),
        ("evaluate", same.model_copy()),  # the same point as quantize
        ("export", fake_metrics(0.9101, 15_100, 0.0501)),  # next to it
    ]
    return Report(
        recipe="labels",
        tool_version="0",
        device="cpu",
        seed=0,
        output="out",
        baseline=fake_metrics(0.93, 60_000, 0.09),  # the same point as finetune
        stages=[
            StageEntry(index=i, name=t, type=t, duration_s=0, metrics=m, notes="", details={}, artifacts=[])
            for i, (t, m) in enumerate(stages, start=1)
        ],
    )


def _text_boxes(fig, ax):
    from matplotlib.text import Annotation, Text

    renderer = fig.canvas.get_renderer()
    return {t.get_text(): Text.get_window_extent(t, renderer) for t in ax.texts if isinstance(t, Annotation)}


def test_labels_of_shared_points_do_not_overlap():
    import matplotlib.pyplot as plt

    fig = report_figure(_report())
    try:
        fig.canvas.draw()  # what savefig draws: the extents below are the saved image's
        full = fig.bbox
        for ax in fig.axes:
            boxes = _text_boxes(fig, ax)
            assert set(boxes) == {"baseline", "1.finetune", "2.prune", "3.quantize", "4.evaluate", "5.export"}
            for (a, ba), (b, bb) in itertools.combinations(boxes.items(), 2):
                assert not ba.overlaps(bb), f"{a} overlaps {b}"
            for name, box in boxes.items():
                assert full.contains(box.x0, box.y0) and full.contains(box.x1, box.y1), name
            ticks = [t.get_text() for t in ax.get_xticklabels() + ax.get_xticklabels(minor=True)]
            assert ax.get_xscale() == "log"
            assert any(ticks) and not any("10^" in t or "$" in t for t in ticks)
    finally:
        plt.close(fig)


def test_many_labels_on_one_point_still_do_not_overlap():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
    try:
        ax.scatter([1, 2], [1, 2])
        points = [(1.0, 1.0, f"stage {i}") for i in range(10)] + [(2.0, 2.0, "other")]
        fig.tight_layout()
        anns = place_labels(ax, points)
        fig.canvas.draw()
        assert len(anns) == 11
        boxes = list(_text_boxes(fig, ax).values())
        assert len(boxes) == 11
        assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
    finally:
        plt.close(fig)
