"""report.json keeps its shape: the typed report models serialise to the keys, key order and value
types the dicts they replaced wrote (report_shape.json was written from a quickstart run of the code
before the models)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import compress_cli
from compress_cli.report import Metrics, Report, StageEntry

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def shape(v: Any) -> Any:
    """The value with every leaf replaced by its type's name (dict order kept)."""
    if isinstance(v, dict):
        return {k: shape(x) for k, x in v.items()}
    if isinstance(v, list):
        return [shape(x) for x in v]
    return type(v).__name__


def test_quickstart_report_json_keeps_its_shape(tmp_path):
    compress_cli.run(REPO / "recipes" / "quickstart.yaml", device="cpu", output=str(tmp_path / "out"))
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    want = json.loads((HERE / "report_shape.json").read_text())
    # a paired speedup's ``unstable``: the reason, or null when stable (the machine decides which)
    for m in [on_disk["final"], *(s["metrics"] for s in on_disk["stages"])]:
        for d in [m, *m.get("paired", [])]:
            if d.get("unstable") is None and "unstable" in d:
                d["unstable"] = "stable"
    # dumps compares key order too (dict equality would not)
    assert json.dumps(shape(on_disk), indent=1) == json.dumps(want, indent=1)


def test_models_write_only_the_keys_that_were_set():
    m = Metrics(
        accuracy=0.5, loss=1.0, samples=2, params=3, nonzero_params=3, sparsity=0.0, runtime="x", device="cpu"
    )
    m.macs = None  # set to None: written as null, as the dict wrote it
    entry = StageEntry(
        index=1, name="s", type="s", duration_s=1.0, metrics=m, notes="", details={}, artifacts=[]
    )
    report = Report(recipe="r", tool_version="0", device="cpu", seed=0, output="o", stages=[entry])
    d = report.to_dict()
    assert list(d) == ["recipe", "tool_version", "device", "seed", "output", "stages"]
    keys = [
        "accuracy",
        "loss",
        "samples",
        "params",
        "nonzero_params",
        "sparsity",
        "macs",
        "runtime",
        "device",
    ]
    assert list(d["stages"][0]["metrics"]) == keys
    assert d["stages"][0]["metrics"]["sparsity"] == 0.0 and d["stages"][0]["metrics"]["macs"] is None
    assert Report.model_validate(d).to_dict() == d  # a resumed run reads entries back unchanged
