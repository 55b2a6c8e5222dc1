"""The trial table an ``hpo`` stage reports: one row per trial of the study, and value formatting."""

from __future__ import annotations

from typing import Any


def format_value(v: Any) -> str:
    """A parameter or objective value for the notes line: floats to 4 significant digits."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def trial_row(t: Any, worker: str) -> dict[str, Any]:
    """The report row of Optuna trial ``t``; ``ran_here``: this search's ``worker`` ran it."""
    dur = (
        (t.datetime_complete - t.datetime_start).total_seconds()
        if t.datetime_complete and t.datetime_start
        else None
    )
    row: dict[str, Any] = {
        "number": t.number,
        "state": t.state.name.lower(),
        "values": list(t.values) if t.values is not None else None,
        "params": dict(t.params),
        "epochs_reported": len(t.intermediate_values),
        "duration_s": None if dur is None else round(dur, 3),
        "ran_here": t.user_attrs.get("worker") == worker,
    }
    if t.user_attrs.get("defaults"):
        row["defaults"] = True
    if t.user_attrs.get("error"):
        row["error"] = t.user_attrs["error"]
    return row
