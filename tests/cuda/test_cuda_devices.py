"""``device:`` strings: CUDA device numbers on a GPU machine, and on CPU (the device count faked)
the located refusals that come before any model or data loads: ``cuda:7`` where there is one
GPU, ``cuda`` where there is none."""

from __future__ import annotations

import pytest
import torch
import yaml

import compress_cli
from compress_cli.errors import UsageError
from compress_cli.testing import tiny_recipe_dict


def write(tmp_path, device: str, stages=({"type": "finetune", "max_steps_per_epoch": 2},)):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(tmp_path, stages=list(stages), device=device)))
    return path


@pytest.fixture
def nothing_loads(monkeypatch):
    """Model and data loading fail the test if they are reached."""
    import compress_cli.sources.data as data
    import compress_cli.sources.models as models

    def reached(*a, **k):
        raise AssertionError("the model or data was loaded before the device was checked")

    monkeypatch.setattr(models, "load_model", reached)
    monkeypatch.setattr(data, "build_data", reached)


@pytest.mark.parametrize(
    "visible,spec,message",
    [
        (
            1,
            "cuda:7",
            r"device: 'cuda:7': this machine has 1 CUDA device\(s\) \(cuda:0, .*"
            r"set device: cuda:0, cuda or auto",
        ),
        (
            4,
            "cuda:4",
            r"device: 'cuda:4': this machine has 4 CUDA device\(s\) \(cuda:0 to cuda:3, .*set device: cuda:3",
        ),
        (
            0,
            "cuda",
            r"device: 'cuda': CUDA was requested but no CUDA device is available here \(set device: cpu",
        ),
        (0, "cuda:0", r"device: 'cuda:0': CUDA was requested but no CUDA device is available"),
    ],
)
def test_missing_cuda_devices_are_refused_before_anything_loads(
    tmp_path, monkeypatch, nothing_loads, visible, spec, message
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    with pytest.raises(UsageError, match=message):
        compress_cli.run(write(tmp_path, spec))
    assert not (tmp_path / "out").exists()  # nothing written either


def test_auto_without_cuda_is_cpu(monkeypatch):
    from compress_cli.engine.setup import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.cuda
def test_a_numbered_cuda_device_runs_there_and_one_past_the_last_is_refused(tmp_path):
    last = torch.cuda.device_count() - 1
    report = compress_cli.run(write(tmp_path, f"cuda:{last}"))
    assert report["device"] == f"cuda:{last}"
    assert report["stages"][0]["metrics"]["device"] == f"cuda:{last}"
    assert "amp" in report["stages"][0]["notes"]  # finetune trained with mixed precision there
    reloaded = compress_cli.load(tmp_path / "out" / "model")
    assert next(reloaded.parameters()).device.type == "cpu"  # load() builds on CPU; .to() moves it
    with pytest.raises(UsageError, match=rf"device: 'cuda:{last + 1}': this machine has {last + 1} CUDA"):
        (tmp_path / "past").mkdir()
        compress_cli.run(write(tmp_path / "past", f"cuda:{last + 1}"))
