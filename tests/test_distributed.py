"""DDP under torchrun on CPU (Gloo on 127.0.0.1): two processes give the same training as one.

Tolerances, stated:
- against one process that sees the same samples per step (global batch 64 = 2 x 32, the same
  DistributedSampler order): per-epoch train loss within 1e-3 relative, validation and test
  accuracy within one sample -- only float summation order differs;
- against a plain one-process run (its own shuffling): test accuracy within 3 points.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recipe_dict(out: Path, batch_size: int) -> dict:
    return {
        "version": 1,
        "name": "ddp",
        "seed": 0,
        "device": "cpu",
        "model": {"source": "zoo:digits_mlp"},
        "data": {"source": "digits", "batch_size": batch_size},
        "measure": {"latency": None, "macs": False},
        "stages": [{"type": "finetune", "epochs": 3, "lr": 0.003}],
        "output": str(out),
    }


def test_helpers_are_no_ops_in_one_process(monkeypatch):
    from compress_cli.runtime import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dev = torch.device("cpu")
    assert distributed.setup(dev) is dev
    assert not distributed.active() and distributed.is_main() and distributed.world_size() == 1
    assert distributed.all_reduce_sum([1.0, 2.5]) == [1.0, 2.5]
    assert distributed.broadcast({"a": 1}) == {"a": 1}
    assert distributed.any_rank(False) is False


def test_two_gloo_processes_train_like_one(tmp_path):
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from compress_cli.config.recipe import Recipe
    from compress_cli.engine.setup import build_state
    from compress_cli.runtime.measure import evaluate
    from compress_cli.runtime.runners import EagerRunner
    from compress_cli.training import TrainOptions, train

    out = tmp_path / "ddp"
    rpath = tmp_path / "ddp.yaml"
    rpath.write_text(yaml.safe_dump(recipe_dict(out, 32)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "compress_cli",
        "run",
        str(rpath),
    ]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("model: ") == 1  # only rank 0 prints the result
    assert sorted(x.name for x in out.iterdir()) == [
        "model",
        "recipe.yaml",
        "report.json",
        "report.md",
        "report.png",
        "stages",
    ]
    report = json.loads((out / "report.json").read_text())
    ddp_hist = report["stages"][0]["details"]["history"]
    ddp_acc = report["final"]["accuracy"]

    # one process, global batch 64, the DistributedSampler order of a 1-replica group
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recipe = Recipe.model_validate({**recipe_dict(tmp_path / "one", 64), "stages": []})
        state = build_state(recipe, torch.device("cpu"), tmp_path / "one")
        ds = state.data.train_dataset
        loader = DataLoader(ds, batch_size=64, sampler=DistributedSampler(ds, num_replicas=1, rank=0, seed=0))
        res = train(state.model, state, TrainOptions(epochs=3, lr=0.003), loader=loader)
        one_acc = evaluate(
            EagerRunner(state.model, state.device), state.data.loader("test"), state.data.get_task()
        )["accuracy"]
        n_val, n_test = len(state.data.val_dataset), len(state.data.test_dataset)
        for a, b in zip(ddp_hist, res.history, strict=True):
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
            assert abs(a["val_accuracy"] - b["val_accuracy"]) <= 1 / n_val + 1e-9
        assert abs(ddp_acc - one_acc) <= 1 / n_test + 1e-9

        # a plain one-process run (its own shuffling, batch 64): the same quality within 3 points
        import compress_cli

        rpath1 = tmp_path / "one.yaml"
        rpath1.write_text(yaml.safe_dump(recipe_dict(tmp_path / "plain", 64)))
        plain = compress_cli.run(rpath1)
        assert abs(plain["final"]["accuracy"] - ddp_acc) <= 0.03
        assert ddp_acc > 0.85
    finally:
        torch.set_num_threads(n)
