"""One run per output directory: a second run (with or without --force) into a directory a live run
holds is refused at once with one line naming the holder and deletes nothing; a lock left by a dead
process is taken over; a checkpoint deleted under a run is a located error, not ZeroDivisionError."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from compress_cli.cli import app
from compress_cli.engine.lock import LOCK_NAME, acquire
from compress_cli.errors import UsageError
from compress_cli.testing import tiny_recipe_dict

runner = CliRunner()
HELD = r"output .*: in use by another run \(pid (\d+) on (\S+), started (\d{4}-\d\d-\d\dT[\d:]+\+00:00)\)"


def _recipe(tmp: Path, stages: list[dict] | None = None) -> Path:
    d = tiny_recipe_dict(tmp, stages=stages or [{"type": "evaluate"}], measure={"latency": None})
    p = tmp / "recipe.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _holder(out: Path) -> subprocess.Popen:
    """A second process that locks ``out`` (as a run does), writes a file there, and waits."""
    code = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from compress_cli.engine.lock import acquire
        lock = acquire(Path({str(out)!r}))
        (Path({str(out)!r}) / "work.txt").write_text("precious")
        print("locked", flush=True)
        time.sleep(120)
        """
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "locked"
    return p


def test_a_second_run_is_refused_naming_the_holder_and_force_deletes_nothing(tmp_path):
    path = _recipe(tmp_path)
    out = tmp_path / "out"
    holder = _holder(out)
    try:
        for extra in ([], ["--force"], ["--resume"]):
            t0 = time.perf_counter()
            res = runner.invoke(app, ["run", str(path), *extra])
            assert res.exit_code == 2, res.output
            assert time.perf_counter() - t0 < 5  # at once, before any model loads
            lines = res.output.strip().splitlines()
            assert len(lines) == 1, res.output
            m = __import__("re").search(HELD, lines[0])
            assert m, res.output
            assert int(m.group(1)) == holder.pid and m.group(2) == socket.gethostname()
            assert (out / "work.txt").read_text() == "precious"
            assert sorted(p.name for p in out.iterdir()) == sorted([LOCK_NAME, "work.txt"])
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_conflicts_within_one_process_too_and_is_released(tmp_path):
    out = tmp_path / "a" / "out"
    lock = acquire(out)
    record = json.loads((out / LOCK_NAME).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert record["started"] and record["command"]
    with pytest.raises(UsageError, match=HELD):
        acquire(out)
    lock.release()
    assert not (tmp_path / "a").exists()  # made only for the lock: gone with it
    acquire(out).release()


def test_a_lock_file_left_by_a_dead_run_is_taken_over(tmp_path):
    path = _recipe(tmp_path)
    out = tmp_path / "out"
    holder = _holder(out)
    holder.send_signal(signal.SIGKILL)  # the kernel drops its lock; the file and its record stay
    holder.wait()
    assert str(holder.pid) in (out / LOCK_NAME).read_text()
    res = runner.invoke(app, ["run", str(path), "-q", "--force"])
    assert res.exit_code == 0, res.output
    assert (out / "report.json").is_file() and not (out / "work.txt").exists()
    assert not (out / LOCK_NAME).exists()  # released when the run ended


def test_two_real_runs_the_second_with_force_cannot_break_the_first(tmp_path):
    """The crash of issue 21: run B --force deleted live run A's files, then A died of a
    ZeroDivisionError. Now B is refused and A's snapshots stay."""
    path = _recipe(tmp_path, stages=[{"type": "finetune", "epochs": 400, "lr": 0.001}])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "compress_cli", "run", str(path), "-q"]
    a = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not (out / "stages" / "00-baseline" / "state.json").exists():
            assert a.poll() is None, a.communicate()
            assert time.time() - t0 < 120
            time.sleep(0.05)
        b = subprocess.run([*cmd, "--force"], capture_output=True, text=True, timeout=120)
        assert b.returncode == 2, b.stderr
        assert f"in use by another run (pid {a.pid} on {socket.gethostname()}" in b.stderr
        assert (out / "stages" / "00-baseline" / "state.json").is_file() and (out / "recipe.yaml").is_file()
        assert a.poll() is None  # still running, untouched
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait()


def test_a_checkpoint_deleted_under_the_run_is_a_located_error(tmp_path, monkeypatch):
    import compress_cli.checkpoint

    monkeypatch.setattr(compress_cli.checkpoint, "checkpoint_size", lambda d: 0)
    res = runner.invoke(app, ["run", str(_recipe(tmp_path))])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and "ZeroDivisionError" not in res.output
    assert "00-baseline/model is gone; did another process delete the output directory?" in res.output
