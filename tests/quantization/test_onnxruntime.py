"""onnxruntime_int8 on a transformer with mask arithmetic (tiny BERT, named inputs): op types by
model family, percentile calibration, dynamic mode, and the recorded scales rebuilding the graph."""

from __future__ import annotations

import io

import numpy as np
import onnxruntime as ort
import pytest
import torch

from compress_cli.errors import StageError
from compress_cli.quantization.base import sqnr_db
from compress_cli.quantization.onnxruntime import (
    default_op_types,
    ort_quantize,
    ort_record,
    ort_requantize,
    snap_onnx_weights_,
)
from compress_cli.testing import bert_inputs, tiny_bert, tiny_cnn, tiny_mlp

NAMES = ["input_ids", "attention_mask"]


def bert_onnx(model) -> bytes:
    """The fp32 ONNX of a tiny_bert (named inputs, dynamic batch and length)."""
    buf = io.BytesIO()
    axes = {n: {0: "batch", 1: "length"} for n in NAMES} | {"logits": {0: "batch"}}
    with torch.no_grad():
        torch.onnx.export(
            model,
            (),
            buf,
            kwargs=bert_inputs(2, 16),
            dynamo=False,
            opset_version=17,
            input_names=NAMES,
            output_names=["logits"],
            dynamic_axes=axes,
        )
    return buf.getvalue()


def feeds(seed: int, batch: int = 8) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in bert_inputs(batch, 16, seed=seed).items()}


def run(q: bytes, x: dict[str, np.ndarray]) -> torch.Tensor:
    sess = ort.InferenceSession(q, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, x)[0])


@pytest.fixture(scope="module")
def bert():
    model = tiny_bert()
    test = feeds(99, 16)
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in test.items()})
    return model, bert_onnx(model), test, ref


def test_default_op_types_by_model_family():
    assert default_op_types(tiny_bert()) == ["MatMul", "Gemm"]
    assert default_op_types(tiny_cnn()) is None and default_op_types(tiny_mlp()) is None  # as before
    conv_attn = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.MultiheadAttention(4, 2))
    assert default_op_types(conv_attn) == ["MatMul", "Gemm", "Conv"]


def test_static_default_op_types_keep_logits_close(bert):
    model, fp32, test, ref = bert
    cal = [feeds(s) for s in range(1, 4)]
    q = ort_quantize(fp32, cal, False, "minmax", op_types=default_op_types(model))
    ops = {n.op_type for n in __import__("onnx").load_from_string(q).graph.node}
    assert "QuantizeLinear" in ops
    assert sqnr_db(ref, run(q, test)) > 25  # measured 30.3 dB (every op type: 30.3, MatMul only: 35.1)


def test_percentile_works_on_matmul_gemm_and_is_refused_clearly_on_mask_arithmetic(bert):
    model, fp32, test, ref = bert
    cal = [feeds(s) for s in range(1, 3)]
    q = ort_quantize(fp32, cal, False, "percentile", op_types=default_op_types(model))
    assert sqnr_db(ref, run(q, test)) > 25
    with pytest.raises(StageError, match=r"infinite range .*finfo\.min.*op_types_to_quantize: \[MatMul"):
        ort_quantize(fp32, cal, False, "percentile", op_types=None)  # every op type: the mask too


def test_dynamic_mode_records_scales_and_rebuilds_the_same_graph(bert):
    model, fp32, test, ref = bert
    ops = default_op_types(model)
    q = ort_quantize(fp32, [], False, op_types=ops, mode="dynamic")
    graph_ops = {n.op_type for n in __import__("onnx").load_from_string(q).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= graph_ops
    y = run(q, test)
    assert sqnr_db(ref, y) > 30  # measured 38.7 dB
    params, snapped = ort_record(q)
    assert params and len(snapped) >= 12  # 2 layers x 6 matmuls, and more
    snap_onnx_weights_(model, fp32, snapped)  # the model's weights on ORT's grid, as the stage stores
    again = ort_requantize(bert_onnx(model), params, False, None, (), ops, "dynamic", dummy=[feeds(5)])
    assert torch.equal(run(again, test), y)


def test_a_bias_that_quantizes_to_zeros_still_rebuilds_the_same_graph(tmp_path):
    """A bias far below its int32 scale (input scale x weight scale) has all-zero codes: snapped,
    it is zeros. The TorchScript exporter used to share equal parameters as one constant, which
    ONNX Runtime then did not quantize, so load()'s rebuild lacked the recorded bias scales
    (mobilenet_v3_large with re-estimated batch norms; timm's coatnet): our export keeps them apart
    and the rebuild has the same graph and output."""
    from compress_cli.quantization.onnxruntime import load_onnx, write_fp32_onnx

    torch.manual_seed(0)
    c1, c2 = torch.nn.Conv2d(1, 4, 3), torch.nn.Conv2d(4, 4, 3)
    model = torch.nn.Sequential(c1, torch.nn.ReLU(), c2, torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    with torch.no_grad():
        c1.bias.fill_(1e-12)
        c2.bias.fill_(2e-12)

    def export(m, path) -> bytes:
        write_fp32_onnx(m, (1, 8, 8), path, 17, "torchscript")
        return path.read_bytes()

    fp32 = export(model, tmp_path / "a.onnx")
    name = load_onnx(fp32).graph.input[0].name
    g = torch.Generator().manual_seed(0)
    calib = [{name: torch.rand(8, 1, 8, 8, generator=g).numpy()} for _ in range(2)]
    q = ort_quantize(fp32, calib, False)
    params, snapped = ort_record(q)
    assert any(k.endswith("bias_quantized_scale") for k in params)
    snap_onnx_weights_(model, fp32, snapped)
    assert torch.equal(c1.bias, c2.bias)  # both snapped to zeros
    again = ort_requantize(export(model, tmp_path / "b.onnx"), params, False, None, dummy=[calib[0]])
    test = {name: torch.rand(4, 1, 8, 8, generator=g).numpy()}
    assert torch.equal(run(again, test), run(q, test))
