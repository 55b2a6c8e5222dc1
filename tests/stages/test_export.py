from __future__ import annotations

import onnxruntime as ort
import pytest
import torch

from compress_cli.registry import get_stage
from compress_cli.testing import tiny_state


def run_export(tmp_path, **cfg):
    state = tiny_state(tmp_path=tmp_path, model={"source": "zoo:digits_cnn"})
    stage = get_stage("export")
    res = stage(stage.config_class(type="export", **cfg)).run(state)
    return state, res


def test_onnx_legacy_torch_export_and_torchscript(tmp_path):
    state, res = run_export(tmp_path, formats=["onnx", "torch_export", "torchscript"], exporter="legacy")
    files = res.details["files"]
    assert set(files) == {"onnx", "torch_export", "torchscript"}
    for info in files.values():
        assert info["max_abs_diff"] < 1e-3 and info["size_bytes"] > 1000 and info["latency_ms"] > 0
    sess = ort.InferenceSession(files["onnx"]["path"], providers=["CPUExecutionProvider"])
    x = torch.randn(7, 1, 8, 8)  # a batch size never seen at export: the batch axis is dynamic
    y = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert abs(torch.from_numpy(y) - state.model.eval()(x)).max() < 1e-4
    ep = torch.export.load(files["torch_export"]["path"])
    assert ep.module()(x).shape == (7, 10)
    assert res.artifacts == [v["path"] for v in files.values()]


def test_export_of_a_pruned_model_folds_the_masks(tmp_path):
    import torch.nn.utils.prune as P

    state = tiny_state(tmp_path=tmp_path, model={"source": "zoo:digits_cnn"})
    conv = next(m for m in state.model.modules() if isinstance(m, torch.nn.Conv2d))
    P.l1_unstructured(conv, "weight", amount=0.5)
    stage = get_stage("export")
    res = stage(stage.config_class(type="export", formats=["onnx"], exporter="legacy")).run(state)
    assert res.details["files"]["onnx"]["max_abs_diff"] < 1e-4
    assert hasattr(conv, "weight_orig"), "the state's model keeps its masks"


@pytest.mark.slow
def test_onnx_dynamo_exporter(tmp_path):
    _, res = run_export(tmp_path, formats=["onnx"], exporter="dynamo")
    assert res.details["files"]["onnx"]["exporter"] == "dynamo"
