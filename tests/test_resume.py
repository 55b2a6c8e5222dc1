"""Never lose work: --resume after SIGKILL at several points gives the report of an uninterrupted
run; SIGINT saves and exits 130; a changed recipe is refused for --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from compress_cli.cli import app
from compress_cli.testing import tiny_recipe_dict

STAGES = [
    {"type": "finetune", "epochs": 2, "lr": 0.01},
    {"type": "finetune", "epochs": 2, "lr": 0.003, "optimizer": "sgd"},
    {"type": "evaluate"},
]
KEYS = ("accuracy", "loss", "params", "nonzero_params", "size_bytes")


def recipe(tmp: Path, out: str, stages=STAGES, **over) -> Path:
    d = tiny_recipe_dict(tmp, stages=stages, output=str(tmp / out), measure={"latency": None}, **over)
    p = tmp / f"{out}.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "compress_cli", "run", *args, "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def final(out: Path) -> dict:
    r = json.loads((out / "report.json").read_text())
    return {k: r["final"][k] for k in KEYS}, [
        (s["type"], {k: s["metrics"][k] for k in KEYS}) for s in r["stages"]
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    p = cli(str(recipe(tmp, "ref")))
    assert p.wait(timeout=300) == 0, p.stderr.read()
    return final(tmp / "ref")


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, f"finished before {path} appeared: {proc.stderr.read()}"
        assert time.time() - t0 < timeout
        time.sleep(0.05)


@pytest.mark.parametrize("kill_after", ["00-baseline", "01-finetune", "02-finetune"])
def test_sigkill_then_resume_equals_uninterrupted(kill_after, tmp_path, reference):
    path = recipe(tmp_path, "run")
    out = tmp_path / "run"
    p = cli(str(path))
    wait_for(out / "stages" / kill_after / "state.json", p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / "report.json").exists() or json.loads((out / "report.json").read_text()).get(
        "incomplete", True
    )
    r = cli(str(path), "--resume")
    assert r.wait(timeout=300) == 0, r.stderr.read()
    assert final(out) == reference


def test_resume_refuses_a_changed_stage(tmp_path):
    path = recipe(tmp_path, "run")
    res = CliRunner().invoke(app, ["run", str(path), "-q"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["run", str(path), "-q", "--resume", "--set", "stages.1.lr=0.5"])
    assert res.exit_code == 2
    assert "stages[1] (finetune) differs from its snapshot (changed: lr)" in res.output
    res = CliRunner().invoke(app, ["run", str(path), "-q", "--resume", "--set", "seed=3"])
    assert res.exit_code == 2 and "model, data, seed or measure section changed" in res.output


def test_resume_with_no_snapshot_yet_starts_from_the_beginning(tmp_path, reference):
    """A retry wrapper's --resume after a kill in the first seconds (no directory yet, or only what
    the killed run wrote before its first snapshot, its lock file included) just runs."""
    path = recipe(tmp_path, "run")
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["run", str(path), "--resume"])
    assert res.exit_code == 0, res.output
    said = f"--resume: no snapshot in {out / 'stages'} yet; starting from the beginning"
    assert "".join(said.split()) in "".join(res.output.split())  # rich wraps long lines
    assert final(out) == reference
    # what a run killed before its baseline snapshot leaves behind
    for p in sorted(out.iterdir()):
        if p.name != "recipe.yaml":
            __import__("shutil").rmtree(p) if p.is_dir() else p.unlink()
    (out / "stages" / "00-baseline" / "model").mkdir(parents=True)
    (out / "stages" / "00-baseline" / "model" / ".weights.safetensors.xz.tmp").write_bytes(b"half")
    (out / ".compress.lock").write_text('{"pid": 999999999, "host": "gone", "started": "then"}')
    res = CliRunner().invoke(app, ["run", str(path), "--resume"])
    assert res.exit_code == 0, res.output
    assert "".join(said.split()) in "".join(res.output.split()) and final(out) == reference
    assert not (out / "stages" / "00-baseline" / "model" / ".weights.safetensors.xz.tmp").exists()


def test_resume_with_no_snapshot_keeps_files_it_did_not_write(tmp_path):
    path = recipe(tmp_path, "run")
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    res = CliRunner().invoke(app, ["run", str(path), "-q", "--resume"])
    assert res.exit_code == 2 and "exists and is not empty (use --force" in res.output
    assert (out / "notes.txt").read_text() == "mine"


def test_resume_of_a_finished_run_only_rewrites_the_result(tmp_path):
    path = recipe(tmp_path, "run")
    assert CliRunner().invoke(app, ["run", str(path), "-q"]).exit_code == 0
    before = final(tmp_path / "run")
    res = CliRunner().invoke(app, ["run", str(path), "-q", "--resume"])
    assert res.exit_code == 0, res.output
    assert final(tmp_path / "run") == before


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_finishes_the_step_saves_and_exits_130(sig, tmp_path):
    stages = [{"type": "finetune", "epochs": 400, "lr": 0.001}]
    path = recipe(tmp_path, "run", stages=stages)
    out = tmp_path / "run"
    p = cli(str(path), env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wait_for(out / "stages" / "00-baseline" / "state.json", p)
    time.sleep(1.0)
    p.send_signal(sig)
    assert p.wait(timeout=60) == 130
    err = p.stderr.read()
    assert f"interrupted by {sig.name} during stage 1 (finetune); no stage had finished" in err
    assert "--resume" in err
    assert (out / "stages" / "01-finetune" / "interrupted" / "model" / "manifest.json").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["incomplete"] is True and "interrupted" in report["error"]


def test_resume_after_prune_keeps_the_masks_through_later_training(tmp_path):
    """The snapshot carries the pruning masks in force: a finetune resumed after a prune stage keeps
    the pruned weights at zero, as the uninterrupted run does (bit for bit)."""
    import shutil

    stages = [{"type": "prune", "sparsity": 0.7}, {"type": "finetune", "epochs": 2, "lr": 0.01}]
    path = recipe(tmp_path, "run", stages=stages)
    out = tmp_path / "run"
    assert CliRunner().invoke(app, ["run", str(path), "-q"]).exit_code == 0
    reference = final(out)
    assert (out / "stages" / "01-prune" / "masks.safetensors.xz").is_file()
    shutil.rmtree(out / "stages" / "02-finetune")  # as if killed during the finetune
    (out / "report.json").unlink()
    res = CliRunner().invoke(app, ["run", str(path), "-q", "--resume"])
    assert res.exit_code == 0, res.output
    assert final(out) == reference
    assert reference[0]["nonzero_params"] < 0.35 * reference[0]["params"]


def test_sigkill_inside_a_training_stage_resumes_from_its_last_checkpoint(tmp_path):
    """SIGKILL at a random moment of a 30-epoch finetune, after its first mid-stage checkpoint:
    --resume continues from the last checkpoint (the stage is not started over) and the final
    report equals the uninterrupted run's. Prints the work lost (kill time minus the checkpoint's)."""
    import random

    stages = [{"type": "finetune", "epochs": 30, "lr": 0.003, "checkpoint_every_s": 1}, {"type": "evaluate"}]
    ref = recipe(tmp_path, "ref", stages=stages)
    r = cli(str(ref))
    assert r.wait(timeout=300) == 0, r.stderr.read()
    path = recipe(tmp_path, "run", stages=stages)
    out = tmp_path / "run"
    ckpt = out / "stages" / "01-finetune" / "train" / "00.pt"
    p = cli(str(path), env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wait_for(ckpt, p)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.5))
    p.send_signal(signal.SIGKILL)
    killed_at = time.time()
    p.wait()
    lost = killed_at - ckpt.stat().st_mtime
    saved = torch.load(ckpt, weights_only=True)
    r = subprocess.run(  # not quiet: the stage says where it resumes
        [sys.executable, "-m", "compress_cli", "run", str(path), "--resume"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert r.returncode == 0, r.stderr
    if saved["done"]:  # killed after training, before the stage's snapshot (a heavily loaded machine)
        at = "finetune: finished before the interruption"
    else:
        at = f"resuming at epoch {saved['epoch'] + 1}" + (
            f", step {saved['consumed'] + 1}" if saved["consumed"] else ""
        )
    assert at in r.stderr, r.stderr  # progress and messages go to stderr
    print(
        f"work lost: {lost:.3f} s (checkpoint {saved.get('epoch')}, {saved.get('consumed')}, {saved['done']})"
    )
    assert final(out) == final(tmp_path / "ref")
    assert not (out / "stages" / "01-finetune" / "train").exists()  # the stage's snapshot took over
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_after_stage"] == 0
    assert report["stages"][0]["details"]["epochs_run"] == 30


CHAOS = [
    {
        "type": "prune",
        "sparsity": 0.5,
        "schedule": {"steps": 2, "epochs": 2, "lr": 0.01, "checkpoint_every_s": 1},
    },
    {"type": "finetune", "epochs": 4, "lr": 0.003, "checkpoint_every_s": 1},
    {"type": "distill", "epochs": 2, "lr": 0.003, "temperature": 4.0, "alpha": 0.9, "checkpoint_every_s": 1},
    {"type": "codebook", "bits": 4, "epochs": 1, "lr": 0.001, "checkpoint_every_s": 1},
    {"type": "evaluate"},
]


def every_snapshot_loads(out: Path) -> int:
    """Load every complete snapshot folder (state.json written) and every mid-stage checkpoint under
    ``out/stages``; returns how many were loaded."""
    from compress_cli import load

    n = 0
    for d in sorted((out / "stages").glob("[0-9][0-9]-*")):
        if (d / "state.json").is_file():
            json.loads((d / "state.json").read_text())
            load(d / "model")
            n += 1
        for f in sorted((d / "train").glob("*.pt")):
            assert isinstance(torch.load(f, weights_only=True), dict), f
            n += 1
    return n


@pytest.mark.slow
def test_chaos_sigkill_at_random_moments_then_resume_equals_uninterrupted(tmp_path):
    """A 5-stage recipe killed with SIGKILL at 8 moments (half of them as soon as a save is in
    progress, a temporary file in a snapshot folder), resumed each time: every snapshot that exists
    loads after every kill, and the final report equals the uninterrupted run's."""
    import random

    rng = random.Random(21)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ref = recipe(tmp_path, "ref", stages=CHAOS)
    t0 = time.time()
    r = cli(str(ref), env=env)
    assert r.wait(timeout=600) == 0, r.stderr.read()
    duration = time.time() - t0
    path = recipe(tmp_path, "run", stages=CHAOS)
    out = tmp_path / "run"
    kills, in_saves, loaded = 0, 0, 0
    for k in range(8):
        started = (out / "stages" / "00-baseline" / "state.json").is_file()
        p = cli(str(path), *(["--resume"] if started else ["--force"]), env=env)
        t_start = time.time()
        if k % 2:  # as soon as a save is in progress (a temporary ".name.xxxx" file)
            while p.poll() is None and time.time() - t_start < duration:
                if _saving(out):
                    in_saves += 1
                    break
                time.sleep(0.001)
        else:
            time.sleep(rng.uniform(0.5, duration * 0.6))
        if p.poll() is not None:  # finished (or failed) before the kill
            assert p.returncode == 0, p.stderr.read()
            break
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
        if out.exists():
            loaded += every_snapshot_loads(out)
    last = cli(str(path), "--resume", env=env)
    assert last.wait(timeout=600) == 0, last.stderr.read()
    print(f"chaos: {kills} kills ({in_saves} during a save), {loaded} snapshot loads, ref {duration:.1f}s")
    assert kills >= 6
    assert final(out) == final(tmp_path / "ref")
    assert not list((out / "stages").glob("*/train"))


def _saving(out: Path) -> bool:
    """Whether a save is in progress in ``out`` (a temporary ".name" entry under stages/); a folder
    renamed while it is walked ends that look (the run moves snapshots into place as it goes)."""
    try:
        return any(f.name.startswith(".") for f in (out / "stages").rglob("*"))
    except FileNotFoundError:
        return False
