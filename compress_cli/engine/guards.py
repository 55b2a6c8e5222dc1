"""Guards: limits on accuracy drop, latency, size and speedup, checked after every stage and at
the end of the run, and what a violation does (warn, revert to the last good result, or fail)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from compress_cli.config.recipe import GuardConfig
    from compress_cli.engine.snapshots import SnapshotStore
    from compress_cli.report import Metrics, StageEntry
    from compress_cli.stages.base import StageConfig


def violations(guard: GuardConfig, m: Metrics, base: Metrics) -> list[str]:
    """One line per limit of ``guard`` that ``m`` breaks, measured against the baseline ``base``."""
    out = []
    if guard.max_accuracy_drop is not None:
        if m.accuracy is None or base.accuracy is None:
            out.append("guard.max_accuracy_drop: this task reports no accuracy; use guard.max_metric_drop")
        elif (drop := (base.accuracy - m.accuracy) * 100) > guard.max_accuracy_drop:
            out.append(
                f"guard.max_accuracy_drop: accuracy fell {drop:.2f} points (limit {guard.max_accuracy_drop})"
            )
    if guard.max_metric_drop is not None:
        name, _, higher = m.primary_score()
        worse = m.drop_from(base)
        if worse > guard.max_metric_drop:
            how = "fell" if higher else "rose"
            out.append(
                f"guard.max_metric_drop: {name} {how} by {abs(worse):.4g} (limit {guard.max_metric_drop})"
            )
    if guard.max_latency_ms is not None and (m.latency_ms or 0) > guard.max_latency_ms:
        out.append(f"guard.max_latency_ms: latency {m.latency_ms:.3f} ms (limit {guard.max_latency_ms})")
    if guard.max_size_bytes is not None and (m.size_bytes or 0) > guard.max_size_bytes:
        out.append(f"guard.max_size_bytes: checkpoint {m.size_bytes} bytes (limit {guard.max_size_bytes})")
    if guard.min_speedup is not None:
        speedup, how = judged_speedup(m)
        if speedup < guard.min_speedup:
            out.append(f"guard.min_speedup: speedup {speedup:.2f}x{how} (limit {guard.min_speedup}x)")
    return out


def judged_speedup(m: Metrics) -> tuple[float, str]:
    """(the speedup ``guard.min_speedup`` judges, how it was chosen): the paired median, or, when the
    measurement was unstable, its 95% interval's lower bound (a noisy number passes only when even
    its pessimistic end does)."""
    if m.unstable and m.speedup_ci:
        return m.speedup_ci[0], f" (the lower end of its 95% interval: the timing was unstable: {m.unstable})"
    return m.speedup or 0.0, ""


class GuardPolicy:
    """The guard of one run: checks metrics, says what a violation does, and keeps track of the
    result that a failed or reverting guard leaves, the latest snapshot that satisfied every guard.

    ``done``: the report entries of stages already complete (on --resume)."""

    def __init__(
        self, guard: GuardConfig, baseline: Metrics, snapshots: SnapshotStore, done: list[StageEntry]
    ):
        self.guard = guard
        self.baseline = baseline
        self.baseline_dir = snapshots.baseline_dir
        self.good = [(0, snapshots.baseline_dir)] if not baseline.guard_violations else []
        self.good += [(e.index, snapshots.stage_dir(e.index)) for e in done if not e.guard_violations]

    def check(self, m: Metrics) -> list[str]:
        """The violations of ``m`` (empty: every guard holds)."""
        return violations(self.guard, m, self.baseline)

    @staticmethod
    def stage_action(cfg: StageConfig) -> str:
        """What a violation right after the stage ``cfg`` does: its ``on_violation``, else warn."""
        return cfg.on_violation or "warn"

    @property
    def final_action(self) -> str:
        """What a violation of the final result does: the guard's ``on_violation``."""
        return self.guard.on_violation

    def passed(self, index: int, folder: Path) -> None:
        """Stage ``index``'s snapshot in ``folder`` is a result every guard accepts."""
        self.good.append((index, folder))

    @property
    def last_good(self) -> tuple[int, Path]:
        """(stage index, snapshot folder) of the latest good result; (0, baseline) when none."""
        return self.good[-1] if self.good else (0, self.baseline_dir)

    def kept_phrase(self) -> str:
        """``stage N`` or ``the baseline``: the result a failed guard leaves, for messages."""
        index = self.last_good[0]
        return f"stage {index}" if index else "the baseline"

    def install_last_good(self, final_dir: Path) -> int:
        """Copy the latest good snapshot's model to ``final_dir`` (replacing it); returns its index."""
        index, src = self.last_good
        tmp = final_dir.with_name(".model.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(src / "model", tmp)
        if final_dir.exists():
            shutil.rmtree(final_dir)
        tmp.rename(final_dir)
        return index
