"""Runners: measurement through ONNX Runtime, and the same-runtime baseline in the report."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from compress_cli.config.recipe import LatencyConfig
from compress_cli.config.yaml import parse_yaml
from compress_cli.engine.run import run_recipe
from compress_cli.runtime.export import fp32_onnx
from compress_cli.runtime.measure import evaluate, latency
from compress_cli.runtime.ort import OrtModule
from compress_cli.runtime.runners import CompiledRunner, EagerRunner, OrtRunner
from compress_cli.stages.registry import validate
from compress_cli.testing import digits_bundle, tiny_cnn, tiny_recipe_dict


def test_ort_runner_evaluates_and_times_like_eager():
    data = digits_bundle(limit_train=128)
    model = tiny_cnn(seed=0).eval()
    ort_runner = OrtRunner(OrtModule(fp32_onnx(model, data.input_shape)[0], threads=1), threads=1)
    eager = evaluate(EagerRunner(model, torch.device("cpu")), data.loader("test"), data.get_task())
    via_ort = evaluate(ort_runner, data.loader("test"), data.get_task())
    assert via_ort["accuracy"] == eager["accuracy"] and via_ort["loss"] == pytest.approx(
        eager["loss"], rel=1e-4
    )
    t = latency(ort_runner, data.example_input, LatencyConfig(batch_sizes=[1, 16], warmup=1, iterations=3))
    assert t["latency_ms"] > 0 and t["throughput"] > 0 and t["throughput_batch"] == 16
    d = ort_runner.describe()
    assert d["runtime"] == "onnxruntime" and d["device"] == "cpu" and d["provider"] == "CPUExecutionProvider"


def test_compiled_runner_describes_how_it_compiles():
    r = CompiledRunner(tiny_cnn(), torch.device("cpu"), frozen=True)
    assert r.describe() == {
        "runtime": "torch-compiled",
        "device": "cpu",
        "compile": "inductor, freezing, static shapes",
    }


def test_report_names_the_runtime_and_gives_the_same_runtime_baseline(tmp_path):
    d = tiny_recipe_dict(
        tmp_path,
        stages=[{"type": "quantize", "scheme": "onnxruntime_int8"}],
        model={"source": "zoo:digits_cnn"},
        data={"limit_train": 256},
        measure={"latency": {"batch_sizes": [1, 16], "warmup": 1, "iterations": 3}},
    )
    report = run_recipe(validate(parse_yaml(yaml.safe_dump(d))))
    assert report["baseline"]["runtime"] == "torch-eager"
    stage = report["stages"][0]
    assert stage["metrics"]["runtime"] == "onnxruntime" and stage["metrics"]["speedup"] > 0
    same = report["final"]["same_runtime_baseline"]
    assert same["runtime"] == "onnxruntime" and same["model"] == "original fp32"
    assert same["latency_ms"] > 0 and same["throughput"] > 0
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["final"]["same_runtime_baseline"]["runtime"] == "onnxruntime"
    assert (tmp_path / "out" / "model.onnx").is_file()
