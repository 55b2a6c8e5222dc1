"""The openvino runtime and schemes: the runner follows torch (tensor and dict inputs, dict outputs),
openvino_int8 converts, saves and reloads bit-exact, exclude reaches NNCF's ignored scope, the
export stage writes an IR that loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")
pytest.importorskip("nncf")

import compress_cli  # noqa: E402
from compress_cli.checkpoint.codec import _rowgrid  # noqa: E402
from compress_cli.errors import StageError  # noqa: E402
from compress_cli.quantization.fold import fold_batchnorm  # noqa: E402
from compress_cli.quantization.openvino import (
    constant_diff,
    ignored_nodes,
    nncf_quantize,
    put_constants,
    snap_ov_weights_,
)  # noqa: E402
from compress_cli.runtime import openvino as ovrt  # noqa: E402
from compress_cli.runtime.inputs import InputSpec  # noqa: E402
from compress_cli.runtime.openvino import OvModule, ov_convert  # noqa: E402
from compress_cli.runtime.runners import OpenVinoRunner  # noqa: E402
from compress_cli.sources.zoo import digits_cnn  # noqa: E402
from compress_cli.stages.quantize import Quantize, QuantizeConfig  # noqa: E402
from compress_cli.stages.registry import get_stage  # noqa: E402
from compress_cli.testing import (  # noqa: E402
    dict_model,
    outlier_state,
    tiny_recipe_dict,  # noqa: E402
    tiny_state,
)

X = torch.randn(9, 1, 8, 8, generator=torch.Generator().manual_seed(3))


def state_for(tmp_path, model: str = "zoo:digits_cnn", **cfg):
    import yaml

    from compress_cli.config.yaml import parse_yaml
    from compress_cli.engine.setup import build_state
    from compress_cli.stages.registry import validate

    d = tiny_recipe_dict(
        tmp_path,
        stages=[{"type": "quantize", **cfg}],
        device="cpu",
        model={"source": model},
        data={"limit_train": 256},
    )
    return build_state(validate(parse_yaml(yaml.safe_dump(d))), torch.device("cpu"), tmp_path / "out")


def run_stage(tmp_path, model: str = "zoo:digits_cnn", **cfg):
    """Build a state, run one quantize stage on it, save the checkpoint; -> (state, result, dir)."""
    from compress_cli.state import save_snapshot

    state = state_for(tmp_path, model, **cfg)
    result = Quantize(QuantizeConfig(type="quantize", **cfg), 1).run(state)
    save_snapshot(state, tmp_path / "out" / "model")
    return state, result, tmp_path / "out" / "model"


def outputs(fn, x=X):
    with torch.inference_mode():
        return fn(x)


def test_runner_follows_torch_on_tensor_and_dict_inputs():
    torch.manual_seed(0)
    cnn = digits_cnn().eval()
    ov = OvModule(ov_convert(cnn, torch.randn(2, 1, 8, 8))[0], threads=1)
    runner = OpenVinoRunner(ov, 1)
    runner.prepare()
    with torch.no_grad():  # batch 9: never seen at conversion (dynamic batch axis)
        assert torch.allclose(runner(X), cnn(X), atol=1e-5)  # f32 inference, not the CPU's bf16 default
    assert runner.describe()["runtime"] == "openvino"

    tok = dict_model().eval()
    ids = torch.randint(1, 30, (2, 6), generator=torch.Generator().manual_seed(1))
    example = {"attention_mask": torch.ones_like(ids), "input_ids": ids}  # keys not in forward's order
    om, spec, _ = ov_convert(tok, example)
    assert spec.names == ["input_ids", "attention_mask"]
    x = {"input_ids": torch.randint(1, 30, (3, 9)), "attention_mask": torch.ones(3, 9, dtype=torch.long)}
    got, want = OvModule(om)(x), tok(**x)
    assert set(got) == set(want)  # a dict comes back as a dict, other batch and sequence length
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-5)


@pytest.mark.slow  # ~16 s on 2 busy cores: NNCF runs three times (calibrated, recorded, load())
def test_openvino_int8_converts_saves_and_reloads_bit_exact(tmp_path):
    state, res, d = run_stage(tmp_path, scheme="openvino_int8", calibration_batches=2)
    det = res.details
    assert isinstance(state.runner, OpenVinoRunner) and det["runtime"] == "openvino"
    assert det["sqnr_db"] >= 25 and det["fake_quantize"] >= 3 and det["folded_batchnorm"]
    assert "reduce_range" not in state.transforms[-1]
    xml = tmp_path / "out" / "openvino" / "model.xml"
    assert res.artifacts == [str(xml), str(xml.with_suffix(".bin"))]
    direct = outputs(OvModule.from_file(xml))  # the deployable IR runs as measured
    assert torch.equal(outputs(state.runner), direct)
    loaded = compress_cli.load(d)  # rebuilt from the stored module and the recorded constants
    assert isinstance(loaded, OvModule) and torch.equal(outputs(loaded), direct)
    # the checkpoint holds NNCF's int8 weights: every row int8 codes * one scale (8 bits a value)
    assert det["quantized_weights"] == 3 and "weights_not_snapped" not in det  # conv1, conv2, fc
    for name in ("conv1.weight", "conv2.weight", "fc.weight"):
        w = state.model.get_parameter(name).detach().numpy()
        assert _rowgrid(w.reshape(w.shape[0], -1)) is not None, name


def test_exclude_reaches_the_ignored_scope():
    torch.manual_seed(0)
    model, _ = fold_batchnorm(digits_cnn().eval(), torch.randn(2, 1, 8, 8))
    spec = InputSpec.from_example(torch.randn(2, 1, 8, 8))
    om = ov_convert(model, torch.randn(2, 1, 8, 8))[0]
    found = ignored_nodes(om, ["conv2", "fc"])
    assert found["conv2"] == ["__module.conv2/aten::_convolution/Convolution"]
    assert found["fc"] and all(n.startswith("__module.fc/") for n in found["fc"])
    batches = [torch.randn(4, 1, 8, 8) for _ in range(2)]

    def fq(excluded: list[str]) -> set[str]:
        q = nncf_quantize(ov_convert(model, torch.randn(2, 1, 8, 8))[0], spec, batches, excluded, False)
        return {op.get_friendly_name() for op in q.get_ordered_ops() if op.get_type_name() == "FakeQuantize"}

    every, fewer = fq([]), fq(["conv2"])
    # conv2's input quantizer (on relu1's output) and its weight quantizer are gone, nothing else
    assert fewer < every and not any("conv2" in n for n in fewer)
    assert any(n.startswith("__module.relu1/") for n in every - fewer)


def test_every_layer_the_budget_ranks_has_nodes_in_the_ignored_scope(tmp_path):
    """The budget's fallback candidates are module names; on the BN-folded model each one's
    IgnoredScope pattern matches its OpenVINO nodes (the conv names survive the folding), so
    every fallback step excludes something."""
    from compress_cli.quantization import handler
    from compress_cli.quantization.budget import _Budget

    state = tiny_state({"source": "zoo:outlier_cnn"}, tmp_path, limit_train=64)
    cfg = QuantizeConfig(type="quantize", scheme="openvino_int8", max_accuracy_drop=0.5)
    names = _Budget(handler("openvino_int8"), state, cfg, "quantize").candidates()
    assert names == ["conv1", "gain", "conv2", "fc1", "fc2"]
    x = torch.rand(2, 1, 8, 8)
    model, folded = fold_batchnorm(state.model.eval(), x)
    assert folded
    found = ignored_nodes(ov_convert(model, x)[0], names)
    assert all(found[n] for n in names), found
    assert "__module.gain/aten::_convolution/GroupConvolution" in found["gain"]  # depthwise


def test_preflight_refuses_an_exclude_without_nodes_and_leaves_the_state(tmp_path):
    state = state_for(tmp_path, scheme="openvino_int8")
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    Quantize(QuantizeConfig(type="quantize", scheme="openvino_int8"), 1).preflight(state)
    assert state.transforms == [] and state.runner is None
    assert all(torch.equal(v, state.model.state_dict()[k]) for k, v in before.items())
    bad = QuantizeConfig(type="quantize", scheme="openvino_int8", exclude=["bn1"])  # folded into conv1
    with pytest.raises(StageError, match="exclude: module bn1 has no OpenVINO node"):
        Quantize(bad, 1).preflight(state)


def test_export_writes_an_ir_that_loads(tmp_path):
    state = tiny_state(tmp_path=tmp_path, model={"source": "zoo:digits_cnn"})
    stage = get_stage("export")
    res = stage(stage.config_class(type="export", formats=["openvino"])).run(state)
    info = res.details["files"]["openvino"]
    xml = tmp_path / "out" / "export" / "model.xml"
    assert info["path"] == str(xml) and res.artifacts == [str(xml), str(xml.with_suffix(".bin"))]
    assert info["max_abs_diff"] < 1e-4 and info["size_bytes"] > xml.stat().st_size
    x = torch.randn(7, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(OvModule.from_file(xml)(x), state.model.eval()(x), atol=1e-5)


@pytest.mark.slow  # ~20 s of CPU on the tiny model: 8 NNCF conversions (preflight, 2 steps x 3, load())
def test_budget_keeps_the_outlier_layer_in_float_and_load_rebuilds_it(tmp_path):
    """openvino_int8 under max_accuracy_drop on the outlier CNN: plain int8 is far over the budget,
    conv2 (whose input is the outlier tensor) goes back to float through NNCF's ignored scope, the
    entry records it, and load() rebuilds the kept result exactly."""
    from compress_cli.state import save_snapshot

    state = outlier_state(tmp_path)
    cfg = QuantizeConfig(
        type="quantize",
        scheme="openvino_int8",
        calibration_batches=1,
        min_sqnr_db=0,
        max_accuracy_drop=0.005,  # cosine (fidelity's units)
        max_float_layers=2,
        budget_batches=2,
    )
    res = Quantize(cfg, 1).run(state)
    b = res.details["budget"]
    assert b["steps"][0]["drop"] > 0.05 and b["met"] and b["float_layers"] == ["conv2"], b["steps"]
    assert b["sensitivity"][0]["layer"] == "conv2" and not res.violations
    assert state.transforms[-1]["exclude"] == ["conv2"] and len(state.transforms) == 1
    assert res.details["ignored_nodes"] >= 1 and res.details["quantized_weights"] == 4  # all but conv2
    save_snapshot(state, tmp_path / "model")
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    loaded = compress_cli.load(tmp_path / "model")
    assert isinstance(loaded, OvModule) and torch.equal(outputs(loaded, x), outputs(state.runner, x))


def test_recorded_constants_turn_a_dummy_batch_rebuild_into_the_calibrated_model():
    """What load() does: the same graph quantized on a dummy batch, the recorded constants put back."""
    torch.manual_seed(0)
    model, _ = fold_batchnorm(digits_cnn().eval(), torch.randn(2, 1, 8, 8))
    spec = InputSpec.from_example(torch.randn(2, 1, 8, 8))
    example = spec.example(2)
    fp32 = ov_convert(model, example)[0]
    calibrated = nncf_quantize(fp32, spec, [torch.randn(8, 1, 8, 8)], [], False)
    # the stored weights: NNCF's int8 grid (codes * scale), rows the codec stores at 8 bits a value
    snapped, left = snap_ov_weights_(model, fp32, calibrated)
    assert sorted(snapped) == ["conv1.weight", "conv2.weight", "fc.weight"] and not left
    for name in snapped:
        w = model.get_parameter(name).detach().numpy()
        assert _rowgrid(w.reshape(w.shape[0], -1)) is not None, name
    rebuilt = nncf_quantize(ov_convert(model, example)[0], spec, [example], [], False)
    recorded = constant_diff(calibrated, rebuilt)
    assert recorded and all(r["name"].endswith(("_low", "_high", "_N")) for r in recorded.values())
    # ranges, bias corrections, the first layer's codes (int8) and scales: never a float weight
    assert all(
        r["value"]["dtype"] != "float32" or np.prod(r["value"]["shape"]) <= 32 for r in recorded.values()
    ), [r["value"]["shape"] for r in recorded.values()]
    assert not torch.equal(outputs(OvModule(rebuilt)), outputs(OvModule(calibrated)))
    assert torch.equal(outputs(OvModule(put_constants(rebuilt, recorded))), outputs(OvModule(calibrated)))


# ------------------------------------------------------------------ inference_precision (f32 | bf16)
def _precision(module: OvModule) -> str:
    """The INFERENCE_PRECISION_HINT ``module`` was compiled with, as OpenVINO reports it."""
    module.compile()
    return module.__dict__["_compiled"].get_property("INFERENCE_PRECISION_HINT").get_type_name()


needs_bf16 = pytest.mark.skipif(
    not ovrt.bf16_supported(), reason="this CPU has no bf16 units (OPTIMIZATION_CAPABILITIES)"
)


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ({"scheme": "int8_static", "inference_precision": "bf16"}, "inference_precision: not an option"),
        ({"scheme": "auto", "inference_precision": "bf16"}, "not an option of scheme auto"),
        ({"scheme": "openvino_fp32", "inference_precision": "fp16"}, "inference_precision"),
    ],
)
def test_inference_precision_is_an_openvino_option(tmp_path, stage, message):
    import yaml

    from compress_cli.config.yaml import parse_yaml
    from compress_cli.errors import RecipeError
    from compress_cli.stages.registry import validate

    d = tiny_recipe_dict(tmp_path, stages=[{"type": "quantize", **stage}])
    with pytest.raises(RecipeError, match=message) as e:
        validate(parse_yaml(yaml.safe_dump(d)))
    assert "stages[0] (quantize)" in str(e.value)
    ok = {"type": "quantize", "scheme": "openvino_int8", "inference_precision": "bf16"}
    ok = tiny_recipe_dict(tmp_path, stages=[ok])
    validate(parse_yaml(yaml.safe_dump(ok)))


@pytest.mark.parametrize("scheme", ["openvino_fp32", "openvino_int8"])
def test_bf16_without_cpu_support_is_a_preflight_error(tmp_path, monkeypatch, scheme):
    monkeypatch.setattr(ovrt, "bf16_supported", lambda: False)
    state = state_for(tmp_path, scheme=scheme)
    cfg = QuantizeConfig(type="quantize", scheme=scheme, inference_precision="bf16")
    with pytest.raises(StageError, match=r"inference_precision: bf16 .* no BF16 here; set inference_"):
        Quantize(cfg, 1).preflight(state)
    assert state.transforms == [] and state.runner is None


def test_the_entry_records_f32_by_default_and_load_compiles_with_it(tmp_path):
    state, res, d = run_stage(tmp_path, scheme="openvino_fp32")
    assert state.transforms[-1]["inference_precision"] == "f32"
    assert res.details["inference_precision"] == "f32"
    loaded = compress_cli.load(d)
    assert isinstance(loaded, OvModule) and _precision(loaded) == "f32"
    assert ovrt.compile_config(2, "bf16") == {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "bf16",
        "INFERENCE_NUM_THREADS": 2,
    }


@needs_bf16
def test_openvino_fp32_in_bf16_is_recorded_and_load_compiles_it_so(tmp_path):
    state, res, d = run_stage(tmp_path, scheme="openvino_fp32", inference_precision="bf16")
    assert state.transforms[-1]["inference_precision"] == "bf16" and "bf16 inference" in res.notes
    assert _precision(state.runner.model) == "bf16"
    loaded = compress_cli.load(d)
    assert isinstance(loaded, OvModule) and _precision(loaded) == "bf16"
    assert torch.equal(outputs(loaded), outputs(state.runner))  # compiled the same way: same numbers
    f32 = OvModule(loaded.ov_model)
    assert _precision(f32) == "f32" and not torch.equal(outputs(f32), outputs(loaded))  # bf16 really ran
    with torch.no_grad():
        assert torch.allclose(outputs(loaded), outputs(state.original_model().eval()), atol=0.1)


@needs_bf16
@pytest.mark.slow  # ~15 s on 2 busy cores: NNCF runs three times (calibrated, recorded, load())
def test_openvino_int8_in_bf16_passes_the_gate_and_reloads_bit_exact(tmp_path):
    cfg = {"calibration_batches": 2, "inference_precision": "bf16"}
    state, res, d = run_stage(tmp_path, scheme="openvino_int8", **cfg)
    assert state.transforms[-1]["inference_precision"] == "bf16" and res.details["sqnr_db"] >= 20
    loaded = compress_cli.load(d)
    assert _precision(loaded) == "bf16" and torch.equal(outputs(loaded), outputs(state.runner))
