"""Paired timing (runtime.timing): an injected slowdown shows in the ratio, a noisy side is flagged
unstable and re-measured within its budget, a 100x outlier in the baseline does not become a
speedup, guards judge an unstable speedup by its interval's lower bound, and ``compress bench``
re-measures a finished run."""

from __future__ import annotations

import json
import random
import time

import pytest
import yaml
from typer.testing import CliRunner

import compress_cli
from compress_cli.cli import app
from compress_cli.config.recipe import GuardConfig
from compress_cli.engine.guards import violations
from compress_cli.report import Metrics
from compress_cli.runtime import timing
from compress_cli.runtime.machine import machine_facts
from compress_cli.runtime.timing import (
    PairedTiming,
    bootstrap_median_ci,
    instability,
    measure_pair,
    time_pair,
)
from compress_cli.testing import tiny_recipe_dict


@pytest.fixture
def quiet_machine(monkeypatch):
    """Other processes' CPU use reads as none (the shared test machine's load is not under test)."""
    monkeypatch.setattr(timing.CpuWatch, "others", lambda self: 0.0)


def sleeper(seconds: float):
    return lambda _x: time.sleep(seconds)


def test_injected_slowdown_shows_in_the_paired_ratio(quiet_machine):
    p = time_pair(sleeper(0.004), sleeper(0.002), None, batch=1, rounds=8, calls=2)
    assert 1.5 < p.ratio < 2.5, p  # sleeps wake late on a busy machine: the bounds are loose
    assert p.ci[0] <= p.ratio <= p.ci[1]
    assert 3.5 < p.a_ms_p50 < 8 and 1.5 < p.b_ms_p50 < 5
    assert len(p.round_ratios) == 8 and p.to_dict()["ci"] == [round(p.ci[0], 4), round(p.ci[1], 4)]


def test_tight_rounds_are_stable_and_wide_ones_are_not():
    p = PairedTiming(1, 10, 2, 4, 4.2, 2, 2.1, 2.0, (1.9, 2.1), 1.05, 0.0, 1, 2, 0.1)
    assert instability(p) is None
    p.spread = 1.8
    assert "rounds spread" in (instability(p) or "")
    p.spread, p.ci = 1.05, (1.2, 2.9)
    assert "interval" in (instability(p) or "")


def test_a_noisy_side_is_flagged_unstable_and_remeasured_within_budget(quiet_machine):
    rng = random.Random(0)

    def noisy(_x):  # half the calls, at random, ten times slower: the rounds' ratios spread far
        time.sleep(0.01 if rng.random() < 0.5 else 0.001)

    t0 = time.perf_counter()
    p = measure_pair(sleeper(0.001), noisy, None, budget_s=0.3, batch=1, rounds=6, calls=2)
    assert time.perf_counter() - t0 < 1.5
    assert p.unstable and ("spread" in p.unstable or "interval" in p.unstable)
    assert p.attempts >= 2  # re-measured while the budget lasted
    once = measure_pair(sleeper(0.001), noisy, None, budget_s=0, batch=1, rounds=6, calls=2)
    assert once.attempts == 1 and once.unstable


def test_a_100x_outlier_in_the_baseline_side_moves_the_median_ratio_little(quiet_machine):
    calls = iter(range(10**6))

    def baseline(_x):
        time.sleep(0.1 if next(calls) == 3 else 0.001)  # one call 100x slower

    p = time_pair(baseline, sleeper(0.001), None, batch=1, rounds=9, calls=2)
    assert 0.7 < p.ratio < 1.4, p
    assert p.a_ms_p90 < 10  # the outlier is one call in 18: not even the p90


def test_busy_machine_is_a_reason():
    p = PairedTiming(1, 10, 2, 1, 1, 1, 1, 2.0, (1.9, 2.1), 1.05, 3.0, 2, 2, 0.1)
    assert "machine busy" in (instability(p) or "")
    p.others_cpu = 0.2
    assert instability(p) is None


def test_bootstrap_interval_is_seeded_and_brackets_the_median():
    v = [1.0, 1.1, 0.9, 1.05, 0.95, 1.2, 0.8]
    assert bootstrap_median_ci(v, seed=1) == bootstrap_median_ci(v, seed=1)
    lo, hi = bootstrap_median_ci(v)
    assert lo <= 1.0 <= hi


def _metrics(**kw):
    base = {"samples": 1, "params": 1, "nonzero_params": 1, "sparsity": 0.0, "runtime": "x", "device": "cpu"}
    return Metrics(**base, **kw)


def test_min_speedup_judges_an_unstable_speedup_by_its_lower_bound():
    guard = GuardConfig(min_speedup=2.0)
    base = _metrics()
    assert violations(guard, _metrics(speedup=2.5, speedup_ci=[1.5, 3.0]), base) == []
    v = violations(guard, _metrics(speedup=2.5, speedup_ci=[1.5, 3.0], unstable="machine busy"), base)
    assert len(v) == 1 and "1.50x" in v[0] and "lower end" in v[0]


def test_a_100x_slow_baseline_measurement_does_not_reach_the_report(tmp_path, monkeypatch):
    """The baseline's own (unpaired) latency comes out 100x too slow, as a busy machine did to
    fashion_prune_distill; the reported speedup is the paired one."""
    from compress_cli.runtime import measure

    real, seen = measure.latency, []

    def slow_first(*a, **kw):
        out = real(*a, **kw)
        if not seen:
            out["latency_ms"] *= 100
        seen.append(1)
        return out

    monkeypatch.setattr(measure, "latency", slow_first)
    d = tiny_recipe_dict(tmp_path, stages=[{"type": "prune", "sparsity": 0.5}])
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(d))
    report = compress_cli.run(p)
    final = report["final"]
    assert final["speedup_unpaired"] > 30  # the unpaired ratio carries the outlier ...
    assert final["speedup"] < 5  # ... the reported one does not (unstructured sparsity: about 1x)
    assert final["speedup_ci"][0] <= final["speedup"] <= final["speedup_ci"][1]
    assert [x["batch"] for x in final["paired"]] == [1, 32]
    assert report["machine"]["cores"] >= 1 and report["machine"]["load_end"] is not None
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Speedup, measured paired" in md and "## Machine" in md


def test_bench_remeasures_a_finished_run(tmp_path):
    d = tiny_recipe_dict(tmp_path, stages=[{"type": "prune", "sparsity": 0.5}])
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(d))
    compress_cli.run(p)
    out = tmp_path / "out"
    before = json.loads((out / "report.json").read_text())
    res = CliRunner().invoke(app, ["bench", str(out), "--json", "--no-write"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert [x["batch"] for x in got["paired"]] == [1, 32] and got["speedup"] > 0
    assert json.loads((out / "report.json").read_text()) == before  # --no-write
    res = CliRunner().invoke(app, ["bench", str(out)])
    assert res.exit_code == 0, res.output
    assert "speedup [95%]" in res.stdout and "updated" in res.stdout
    after = json.loads((out / "report.json").read_text())
    assert after["final"]["paired"] != before["final"]["paired"]  # measured again
    assert after["final"]["accuracy"] == before["final"]["accuracy"]
    res = CliRunner().invoke(app, ["bench", str(tmp_path)])
    assert res.exit_code == 2 and "finished run" in res.output


def test_machine_facts_name_cpu_threads_and_versions():
    m = machine_facts()
    assert m["cpu"] and m["threads"] >= 1 and "torch" in m["versions"]
    assert "omp_wait_policy" in m


def test_an_unstable_speedup_is_shown_as_its_interval_only():
    from compress_cli.report import speedup_text

    assert speedup_text(_metrics(speedup=3.0, speedup_ci=[2.9, 3.1])) == "3.00× [2.90-3.10]"
    shown = speedup_text(_metrics(speedup=249.0, speedup_ci=[0.9, 412.0], unstable="machine busy"))
    assert shown == "0.90-412.00× unstable" and "249" not in shown


def test_the_cli_sleeps_openmp_threads_unless_the_user_chose_a_policy():
    import os
    import subprocess
    import sys

    code = "import os; from compress_cli.cli import app; print(os.environ['OMP_WAIT_POLICY'])"
    env = {
        k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "COMPRESS_SET_OMP_WAIT_POLICY")
    }
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert got.stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert got.stdout.strip() == "ACTIVE"
