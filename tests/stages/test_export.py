from __future__ import annotations

import onnxruntime as ort
import pytest
import torch

from compress_cli.stages.registry import get_stage
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


def test_legacy_exporter_takes_multihead_attention():
    """Eval without grad sends nn.MultiheadAttention down its fused fast path, an op the TorchScript
    exporter has no symbolic for; the export takes the standard path (same outputs) and leaves the
    fast path switched on for everyone else."""
    from compress_cli.runtime.export import onnx_bytes

    class Attn(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Linear(8, 16)
            self.attn = torch.nn.MultiheadAttention(16, 4, batch_first=True)
            self.head = torch.nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x.flatten(1, 2))  # (N, 8, 8): the image rows as 8 tokens
            return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))

    torch.manual_seed(0)
    model = Attn().eval()
    data, used = onnx_bytes(model, torch.zeros(2, 1, 8, 8), exporters=("legacy",))
    assert used == "legacy" and torch.backends.mha.get_fastpath_enabled()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        y = model(x)
    assert float(y.abs().max()) > 0.05
    assert abs(torch.from_numpy(sess.run(None, {"input": x.numpy()})[0]) - y).max() < 1e-5


def test_a_failed_torchscript_export_prints_nothing(capfd):
    """torch's TorchScript exporter leaves its C++ log on and prints the whole IR graph to the process's
    stdout when an op fails (here adaptive pooling 9 -> 4); the fallback to dynamo stays silent."""
    from compress_cli.runtime.export import onnx_bytes

    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.AdaptiveAvgPool2d((4, 4)),
        torch.nn.Flatten(),
        torch.nn.Linear(64, 10),
    ).eval()
    before = torch._C._jit_is_onnx_log_enabled()  # another test's direct torch.onnx.export may have set it
    for _ in range(2):  # the second time too: the exporter's switch must not stick
        _, used = onnx_bytes(model, torch.zeros(2, 1, 11, 11), exporters=("legacy", "dynamo"))
        assert used == "dynamo"
    out, err = capfd.readouterr()
    assert "graph" not in out and "graph" not in err
    assert torch._C._jit_is_onnx_log_enabled() == before


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


def quantized_state(tmp_path, scheme: str, source: str = "zoo:digits_cnn"):
    state = tiny_state(tmp_path=tmp_path, model={"source": source})
    q = get_stage("quantize")
    q(q.config_class(type="quantize", scheme=scheme)).run(state)
    return state


@pytest.mark.parametrize(
    ("scheme", "source", "fmt"),
    [
        ("onnxruntime_int8", "zoo:digits_cnn", "onnx"),
        ("int8_static", "zoo:digits_cnn", "torch_export"),
        ("int8_dynamic", "zoo:digits_mlp", "torchscript"),
        ("bf16", "zoo:digits_cnn", "torch_export"),
    ],
)
def test_export_after_quantize_writes_the_quantized_model(tmp_path, scheme, source, fmt):
    state = quantized_state(tmp_path, scheme, source)
    stage = get_stage("export")
    info = stage(stage.config_class(type="export", formats=[fmt])).run(state).details["files"][fmt]
    assert info["quantization"] == scheme
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        ref = state.runner(x) if state.runner is not None else state.model(x)
        if fmt == "onnx":
            sess = ort.InferenceSession(info["path"], providers=["CPUExecutionProvider"])
            got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
            ops = {n.op_type for n in __import__("onnx").load(info["path"]).graph.node}
            assert "QuantizeLinear" in ops and "DequantizeLinear" in ops, "the int8 graph, not an fp32 export"
        elif fmt == "torch_export":
            if scheme == "int8_static":
                import torchao.quantization.pt2e  # noqa: F401 - registers the quantized ops, as the note says

                assert "torchao" in info["load"]
            ep = torch.export.load(info["path"])
            got = ep.module()(x)
            if scheme == "int8_static":
                targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
                assert any("quantize_per" in t for t in targets), "the int8 graph, not the fp32 model"
                stored = [*ep.state_dict.values(), *ep.constants.values()]
                fp32_weights = [t for t in stored if t.dtype == torch.float32 and t.dim() >= 2]
                assert not fp32_weights, "the fp32 weights the int8 graph does not read are stripped"
        else:
            got = torch.jit.load(info["path"])(x)
            assert "quantized" in str(torch.jit.load(info["path"]).graph)
    tol = 1e-3 + 0.02 * float(ref.float().abs().max())
    assert float((got.float() - ref.float()).abs().max()) <= tol


def test_export_refuses_formats_the_quantized_model_has_not_at_validation(tmp_path):
    from compress_cli.config.yaml import parse_yaml
    from compress_cli.errors import RecipeError
    from compress_cli.stages.registry import validate
    from compress_cli.testing import tiny_recipe_dict

    d = tiny_recipe_dict(
        tmp_path,
        stages=[
            {"type": "quantize", "scheme": "onnxruntime_int8"},
            {"type": "export", "formats": ["onnx", "torch_export"]},
        ],
    )
    d["device"] = "cpu"
    import yaml

    with pytest.raises(
        RecipeError,
        match=r"r\.yaml:\d+: stages\[1\] \(export\): format torch_export is not available "
        r"after quantize scheme onnxruntime_int8: the model is an ONNX Runtime int8 graph",
    ):
        validate(parse_yaml(yaml.safe_dump(d, sort_keys=False), "r.yaml"))


def test_export_refuses_at_run_time_too(tmp_path):
    from compress_cli.errors import StageError

    state = quantized_state(tmp_path, "int8_dynamic", "zoo:digits_mlp")
    stage = get_stage("export")
    with pytest.raises(StageError, match="format onnx is not available after quantize scheme int8_dynamic"):
        stage(stage.config_class(type="export", formats=["onnx"])).run(state)


# --------------------------------------------------------------------------- structured inputs
@pytest.mark.parametrize("exporter", ["legacy", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_export_of_a_dict_input_model_names_inputs_and_varies_batch_and_sequence(tmp_path, exporter):
    """tiny BERT on dict batches: ONNX with inputs input_ids / attention_mask, dynamic batch and
    sequence axes (checked by the stage at two batch sizes and two lengths), torch.export with
    keyword inputs; the stage reports the file's interface."""
    from bert_state import bert_state

    from compress_cli.testing import bert_inputs

    state = bert_state(tmp_path)
    stage = get_stage("export")
    formats = ["onnx", "torch_export"] if exporter == "legacy" else ["onnx"]
    res = stage(stage.config_class(type="export", formats=formats, exporter=exporter)).run(state)
    onnx_info = res.details["files"]["onnx"]
    assert onnx_info["exporter"] == exporter and onnx_info["max_abs_diff"] < 1e-4
    assert onnx_info["inputs"] == {
        "input_ids": {"type": "tensor(int64)", "shape": ["batch", "sequence"]},
        "attention_mask": {"type": "tensor(int64)", "shape": ["batch", "sequence"]},
    }
    assert onnx_info["outputs"] == {"logits": {"type": "tensor(float)", "shape": ["batch", 3]}}
    sess = ort.InferenceSession(onnx_info["path"], providers=["CPUExecutionProvider"])
    for batch, length in ((1, 7), (6, 16), (2, 30)):  # two batch sizes x two lengths, beyond the stage's
        x = bert_inputs(batch, length, seed=length)
        with torch.no_grad():
            want = state.model(**x)
        got = torch.from_numpy(sess.run(None, {k: v.numpy() for k, v in x.items()})[0])
        assert torch.allclose(got, want, atol=1e-5)
        if exporter == "legacy":
            ep = torch.export.load(res.details["files"]["torch_export"]["path"])
            assert torch.allclose(ep.module()(**x), want, atol=1e-5)


def test_fp32_roundoff_on_huge_logits_is_not_an_export_mismatch(tmp_path):
    # mobileone_s0 at random init has logits ~1e14: its ONNX file differed by ~1e6 through float32
    # roundoff alone and the absolute tolerance (1e-3) refused a correct export
    state = tiny_state(tmp_path=tmp_path, model={"source": "zoo:digits_cnn"})
    with torch.no_grad():
        for m in state.model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.mul_(1e4)
    stage = get_stage("export")
    res = stage(stage.config_class(type="export", formats=["onnx"], exporter="legacy")).run(state)
    info = res.details["files"]["onnx"]
    assert 1e-3 < info["max_abs_diff"] < 1e-5 * 1e12
