"""Export from a model on the run's device, and the original model moved between devices for
measurement (the ONNX Runtime baseline exports a CPU copy, an original waiting in a file loads
onto the device, the fidelity reference runs there and answers on the caller's device). Every
test runs on CPU and, marked, on CUDA: the moves are no-ops on CPU, but the bodies are the same."""

from __future__ import annotations

import torch

from compress_cli.runtime.export import fp32_onnx
from compress_cli.runtime.inputs import InputSpec
from compress_cli.runtime.ort import OrtModule
from compress_cli.runtime.runners import OrtRunner
from compress_cli.stages.registry import get_stage

X = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(2))


def where(model: torch.nn.Module) -> str:
    return next(model.parameters()).device.type


def test_export_from_the_device_checks_and_moves_back(device, make_state):
    state = make_state(device, model="zoo:digits_cnn")
    stage = get_stage("export")
    res = stage(stage.config_class(type="export", formats=["onnx", "torch_export"], exporter="legacy")).run(
        state
    )
    files = res.details["files"]
    assert set(files) == {"onnx", "torch_export"}
    assert all(info["max_abs_diff"] < 1e-3 and info["latency_ms"] > 0 for info in files.values())
    assert where(state.model) == device.type  # the ONNX export ran on a CPU model: moved back
    assert where(state.original_model()) == device.type
    ep = torch.export.load(files["torch_export"]["path"])  # exported on the device, runs there
    with torch.inference_mode():
        got = ep.module()(X.to(device))
        want = state.model(X.to(device))
    assert got.device.type == device.type and float((got - want).abs().max()) < 1e-4


def test_onnx_baseline_exports_a_cpu_copy_of_the_original(device, make_state):
    state = make_state(device, measure={"latency": {"batch_sizes": [1, 8], "warmup": 1, "iterations": 3}})
    original = state.original_model()
    spec = InputSpec.from_example(state.data.example_input(2), original)
    data, _ = fp32_onnx(original, spec)
    assert where(original) == device.type and not original.training  # left where and as it was
    with torch.inference_mode():
        want = original(X.to(device)).cpu()
    got = OrtModule(data)(X)
    assert float((got - want).abs().max()) < 1e-4
    base = OrtRunner(OrtModule(data), threads=1).same_runtime_baseline(state)
    assert base["device"] == "cpu" and base["runtime"] == "onnxruntime" and base["latency_ms"] > 0
    assert where(state.original_model()) == device.type


def test_an_original_waiting_in_a_file_loads_onto_the_device(device, make_state, monkeypatch):
    import compress_cli.engine.setup as setup

    monkeypatch.setattr(setup, "ORIGINAL_IN_MEMORY_MAX", 0)
    state = make_state(device)
    assert not isinstance(state.original, torch.nn.Module)  # a file
    original = state.original_model()
    assert where(original) == device.type and not any(p.requires_grad for p in original.parameters())
    with torch.inference_mode():
        assert torch.equal(original(X.to(device)), state.model(X.to(device)))


def test_the_fidelity_reference_runs_on_the_device_and_answers_on_the_callers(device, make_state):
    state = make_state(device, task={"type": "fidelity"})
    task = state.data.get_task()
    with torch.inference_mode():
        ref = task.reference_output(X)  # CPU inputs
        ref_dev = task.reference_output(X.to(device))
        want = state.original_model()(X.to(device)).float()
    assert ref.device.type == "cpu" and ref_dev.device.type == device.type
    assert torch.equal(ref, want.cpu()) and torch.equal(ref_dev, want)
