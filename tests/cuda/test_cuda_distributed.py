"""DDP with NCCL. A process group of one (one GPU is enough) is forced down the multi-process paths
(``active()`` made true): NCCL all-reduce and object broadcast on the rank's CUDA device,
DistributedDataParallel with ``device_ids``, the sharded sampler and validation, in a real
``train`` call. The same script runs with Gloo on CPU here. With two GPUs, two torchrun processes
run a recipe on CUDA. (DDP over Gloo on CPU with two processes: tests/test_distributed.py.)"""

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

ROOT = Path(__file__).resolve().parents[2]

WORLD_OF_ONE = r"""
import json, os, sys
import torch, torch.distributed as dist
backend, device, out = sys.argv[1], torch.device(sys.argv[2]), sys.argv[3]
if device.type == "cuda":
    torch.cuda.set_device(device)
dist.init_process_group(backend, rank=0, world_size=1)
from compress_cli.runtime import distributed as d
d.active = lambda: True  # a world of one down the multi-process paths
assert d._reduce_device().type == device.type
assert d.all_reduce_sum([1.0, 2.5]) == [1.0, 2.5]
assert d.broadcast({"a": 1}) == {"a": 1}
assert d.any_rank(True) and not d.any_rank(False)
t = torch.ones(3, device=device)
assert torch.equal(d.all_reduce_tensor_mean(t), t)
from compress_cli.config.recipe import Recipe
from compress_cli.engine.setup import build_state
from compress_cli.testing import tiny_recipe_dict
from compress_cli.training import TrainOptions, train
recipe = Recipe.model_validate(tiny_recipe_dict(out, device=device.type, data={"limit_train": 256}))
state = build_state(recipe, device, os.path.join(out, "out"))
import copy
wrapped = d.wrap_ddp(copy.deepcopy(state.model), device)  # a copy: train() wraps the model itself
assert type(wrapped).__name__ == "DistributedDataParallel"
assert wrapped.device_ids == ([device.index] if device.type == "cuda" else None)
del wrapped
res = train(state.model, state, TrainOptions(epochs=2, lr=0.003))
dist.destroy_process_group()
print(json.dumps({"history": res.history, "device": str(next(state.model.parameters()).device)}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    e = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    e.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        e.pop(k, None)
    return e


def test_a_world_of_one_takes_the_distributed_paths(device, tmp_path):
    backend, dev = ("nccl", "cuda:0") if device.type == "cuda" else ("gloo", "cpu")
    cmd = [sys.executable, "-c", WORLD_OF_ONE, backend, dev, str(tmp_path)]
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["device"] == dev
    assert len(out["history"]) == 2 and out["history"][-1]["train_loss"] < out["history"][0]["train_loss"]
    assert out["history"][-1]["val_accuracy"] > 0.5


@pytest.mark.cuda
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="NCCL across processes needs 2 GPUs",
)
def test_two_nccl_processes_run_a_recipe(tmp_path):
    from compress_cli.testing import tiny_recipe_dict

    stages = [{"type": "finetune", "epochs": 2, "lr": 0.003}]
    recipe = tiny_recipe_dict(
        tmp_path, stages=stages, device="cuda", measure={"latency": None, "macs": False}
    )
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(recipe))
    e = env()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    args = [f"--master_port={e['MASTER_PORT']}", "-m", "compress_cli", "run", str(path)]
    p = subprocess.run(torchrun + args, cwd=tmp_path, env=e, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["device"] == "cuda:0"  # rank 0's device writes the report
    assert report["final"]["accuracy"] > 0.7  # it trained (2 epochs; the plumbing is what is tested)
