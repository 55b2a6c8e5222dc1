"""quantize stage: every CPU scheme on the digits models, SQNR check, exact reload, refusals,
the freeze rule. torch.compile is slow to warm on 2 cores: only the slow-marked test compiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import compress_cli
from compress_cli._utils.arrays import pack_array, unpack_array
from compress_cli.config.yaml import parse_yaml
from compress_cli.engine.setup import build_state
from compress_cli.errors import RecipeError, StageError
from compress_cli.quantization.pt2e import QuantizedGraph
from compress_cli.runtime import export
from compress_cli.runtime.export import fp32_onnx
from compress_cli.runtime.ort import OrtModule
from compress_cli.runtime.runners import CompiledRunner, EagerRunner, OrtRunner
from compress_cli.stages.quantize import Quantize, QuantizeConfig
from compress_cli.stages.registry import validate
from compress_cli.state import save_snapshot
from compress_cli.testing import tiny_recipe_dict

X = torch.randn(9, 1, 8, 8, generator=torch.Generator().manual_seed(3))


def recipe(tmp_path: Path, stages: list[dict], device: str = "cpu", model: str = "zoo:digits_cnn"):
    d = tiny_recipe_dict(
        tmp_path, stages=stages, device=device, model={"source": model}, data={"limit_train": 256}
    )
    return validate(parse_yaml(yaml.safe_dump(d)))


def run_stage(tmp_path: Path, model: str = "zoo:digits_cnn", **cfg):
    """Build a state, run one quantize stage on it, save the checkpoint; -> (state, result, dir)."""
    r = recipe(tmp_path, [{"type": "quantize", **cfg}], model=model)
    state = build_state(r, torch.device("cpu"), tmp_path / "out")
    stage = Quantize(QuantizeConfig(type="quantize", **cfg), 1)
    result = stage.run(state)
    d = tmp_path / "out" / "model"
    save_snapshot(state, d)
    return state, result, d


def outputs(fn, x=X):
    with torch.inference_mode():
        return fn(x)


# --------------------------------------------------------------------------- schemes
def test_packed_arrays_round_trip_exactly():
    a = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    assert np.array_equal(unpack_array(pack_array(a)), a)


def test_int8_dynamic_snaps_linear_weights_and_reloads_equal(tmp_path):
    state, res, d = run_stage(tmp_path, model="zoo:digits_mlp", scheme="int8_dynamic")
    assert isinstance(state.runner, EagerRunner) and res.details["layers"] == ["fc1", "fc2", "fc3"]
    assert res.details["sqnr_db"] >= 30
    w = state.model.fc1.weight.detach()
    for row in w:  # per-channel int8 grid: at most 255 distinct values per output channel
        assert len(torch.unique(row)) <= 255
        scale = row.abs().max() / 127
        assert torch.allclose(row / scale, torch.round(row / scale), atol=1e-3)
    loaded = compress_cli.load(d)
    assert isinstance(loaded.fc1, torch.ao.nn.quantized.dynamic.Linear)
    assert torch.equal(outputs(state.runner), outputs(loaded))


def test_int8_static_pt2e_eager_graph_reloads_bit_exact(tmp_path):
    state, res, d = run_stage(tmp_path, scheme="int8_static", compile=False, calibration_batches=2)
    det = res.details
    assert det["folded_batchnorm"] == ["conv1+bn1", "conv2+bn2"] and det["quantized_weights"] == 3
    assert det["calibration_batches"] == 2 and det["sqnr_db"] >= 30 and det["runtime"] == "torch-eager"
    assert isinstance(state.model.bn1, nn.Identity)
    entry = state.transforms[-1]
    assert entry["type"] == "quantize" and entry["scheme"] == "int8_static"
    conv = next(p for p in entry["qparams"].values() if p["param"] == "conv1.weight")
    scale = torch.from_numpy(unpack_array(conv["scale"])).view(-1, 1, 1, 1)
    q = state.model.conv1.weight.detach() / scale
    assert torch.allclose(q, torch.round(q), atol=1e-4) and q.abs().max() <= 128
    loaded = compress_cli.load(d)
    assert isinstance(loaded, QuantizedGraph) and not loaded.compiled
    assert torch.equal(outputs(state.runner), outputs(loaded))


def test_onnxruntime_int8_writes_onnx_measures_in_ort_and_reloads_equal(tmp_path):
    import onnxruntime as ort

    state, res, d = run_stage(tmp_path, scheme="onnxruntime_int8")
    assert isinstance(state.runner, OrtRunner) and state.runner.describe()["runtime"] == "onnxruntime"
    onnx_path = Path(res.details["onnx_file"])
    assert res.artifacts == [str(onnx_path)] and onnx_path.is_file()
    sess = ort.InferenceSession(onnx_path.read_bytes(), providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in __import__("onnx").load(str(onnx_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    direct = torch.from_numpy(sess.run(None, {"input": X.numpy()})[0])
    assert torch.equal(outputs(state.runner), direct)
    assert res.details["sqnr_db"] >= 25
    loaded = compress_cli.load(d)
    assert isinstance(loaded, OrtModule) and loaded.onnx_bytes == onnx_path.read_bytes()
    assert torch.equal(outputs(loaded), direct)


def test_qat_trains_through_the_shared_loop_then_converts(tmp_path):
    assert Quantize.trains(QuantizeConfig(type="quantize", scheme="qat"))
    assert not Quantize.trains(QuantizeConfig(type="quantize", scheme="int8_static"))
    state, res, d = run_stage(tmp_path, scheme="qat", compile=False, epochs=1, max_steps_per_epoch=3, lr=1e-3)
    assert res.details["training"]["epochs_run"] == 1 and res.details["sqnr_db"] >= 25
    loaded = compress_cli.load(d)
    assert torch.equal(outputs(state.runner), outputs(loaded))


@pytest.mark.parametrize("scheme", ["bf16", "fp16"])
def test_casts_keep_fp32_interface_and_reload(tmp_path, scheme):
    state, res, d = run_stage(tmp_path, scheme=scheme)
    dtype = torch.bfloat16 if scheme == "bf16" else torch.float16
    assert state.model.conv1.weight.dtype == dtype and state.runner is None
    y = outputs(state.model)
    assert y.dtype == torch.float32
    assert torch.equal(y, outputs(compress_cli.load(d)))
    if scheme == "fp16":
        assert "fp16 on CPU" in res.notes


def test_low_sqnr_is_refused_with_the_measured_value(tmp_path):
    with pytest.raises(StageError, match=r"SQNR \d+\.\d dB < min_sqnr_db 99"):
        run_stage(tmp_path, scheme="onnxruntime_int8", min_sqnr_db=99)


def test_int8_on_auto_device_refused_at_run_time_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    r = recipe(tmp_path, [{"type": "quantize", "scheme": "int8_weight_only"}], device="auto")
    state = build_state(r, torch.device("cpu"), tmp_path / "out")
    with pytest.raises(StageError, match="runs on CUDA only.*slower than fp32.*Conv2d.*int4 needs CUDA"):
        Quantize(QuantizeConfig(type="quantize", scheme="int8_weight_only"), 1).run(state)


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("scheme", ["int8_weight_only", "int4_weight_only"])
def test_weight_only_refused_on_cpu_at_validation(tmp_path, scheme):
    with pytest.raises(
        RecipeError, match=rf"{scheme} runs on CUDA only: .*0\.2-0\.7x.*Conv2d.*int4 needs CUDA"
    ):
        recipe(tmp_path, [{"type": "quantize", "scheme": scheme}], device="cpu")
    recipe(tmp_path, [{"type": "quantize", "scheme": scheme}], device="auto")  # decided at run time


def test_cpu_int8_refused_on_cuda_device(tmp_path):
    with pytest.raises(RecipeError, match="int8_static makes a CPU int8 model.*set device: cpu"):
        recipe(tmp_path, [{"type": "quantize", "scheme": "int8_static"}], device="cuda")


@pytest.mark.parametrize("scheme", ["int8_static", "int8_dynamic", "onnxruntime_int8", "qat"])
def test_nothing_trains_or_changes_after_int8(tmp_path, scheme):
    with pytest.raises(
        RecipeError, match=r"stages\[1\] \(finetune\): cannot train after stages\[0\] \(quantize\)"
    ):
        recipe(tmp_path, [{"type": "quantize", "scheme": scheme}, {"type": "finetune"}])
    recipe(tmp_path, [{"type": "quantize", "scheme": scheme}, {"type": "evaluate"}])
    recipe(tmp_path, [{"type": "quantize", "scheme": "bf16"}, {"type": "finetune"}])  # a cast does not freeze


def test_options_of_other_schemes_are_refused(tmp_path):
    with pytest.raises(RecipeError, match="epochs: not an option of scheme int8_static .*applies to qat"):
        recipe(tmp_path, [{"type": "quantize", "scheme": "int8_static", "epochs": 2}])
    with pytest.raises(RecipeError, match="opset: not an option of scheme int8_dynamic"):
        recipe(tmp_path, [{"type": "quantize", "scheme": "int8_dynamic", "opset": 18}])
    with pytest.raises(RecipeError, match=r"scheme: must be one of .*int8_static"):
        recipe(tmp_path, [{"type": "quantize", "scheme": "int9"}])


# --------------------------------------------------------------------------- compiled (slow)
@pytest.mark.slow
def test_int8_static_compiled_matches_reload_and_has_same_runtime_baseline(tmp_path):
    state, res, d = run_stage(tmp_path, scheme="int8_static", calibration_batches=2)
    assert isinstance(state.runner, CompiledRunner) and res.details["runtime"] == "torch-compiled"
    assert res.details["sqnr_db"] >= 30
    loaded = compress_cli.load(d)
    assert loaded.compiled
    assert torch.allclose(outputs(state.runner), outputs(loaded), atol=1e-5)
    base = state.runner.same_runtime_baseline(state)
    assert base["runtime"] == "torch-compiled" and base["latency_ms"] > 0 and base["throughput"] > 0


@pytest.mark.parametrize("scheme", ["int8_dynamic", "onnxruntime_int8"])
def test_pruned_weights_stay_zero_through_quantization(tmp_path, scheme):
    from torch.nn.utils import prune

    r = recipe(tmp_path, [{"type": "quantize", "scheme": scheme}])
    state = build_state(r, torch.device("cpu"), tmp_path / "out")
    prune.l1_unstructured(state.model.fc, "weight", amount=0.5)
    zeros = state.model.fc.weight == 0
    Quantize(QuantizeConfig(type="quantize", scheme=scheme), 1).run(state)
    assert not hasattr(state.model.fc, "weight_orig")  # the reparametrization is made permanent
    w = state.model.fc.weight.detach()
    assert torch.equal(w == 0, zeros) or bool((w[zeros] == 0).all())
    save_snapshot(state, tmp_path / "m")
    assert torch.equal(outputs(state.runner), outputs(compress_cli.load(tmp_path / "m")))


def tiny_shift_state(tmp_path: Path):
    """zoo:digits_resnet whose three same-shaped BatchNorms shift by distinct amounts far below
    their int32 bias step (timm starts transformer MLP biases at std 1e-6): folded into the
    convolutions, int8 snapping rounds those biases to all zeros, so they become equal."""
    r = recipe(tmp_path, [{"type": "quantize", "scheme": "onnxruntime_int8"}], model="zoo:digits_resnet")
    state = build_state(r, torch.device("cpu"), tmp_path / "out")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for bn in (state.model.bn1, state.model.layer1[0].bn1, state.model.layer1[0].bn2):
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=g) * 1e-9)
    return state


def ort_config(**kw) -> QuantizeConfig:
    """onnxruntime_int8 on one calibration batch, no SQNR gate (the model is random)."""
    return QuantizeConfig(
        type="quantize", scheme="onnxruntime_int8", min_sqnr_db=0, calibration_batches=1, **kw
    )


@pytest.mark.parametrize("exporter", ["torchscript", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_onnxruntime_int8_reloads_when_snapping_makes_biases_equal(tmp_path, exporter):
    """The TorchScript exporter merged equal initializers into one and the dynamo exporter drops an
    all-zero bias, so load()'s export of the snapped model quantized to a graph without the
    recorded bias scales (timm coatnet_nano_rw_224 was refused in the preflight)."""
    state = tiny_shift_state(tmp_path)
    res = Quantize(ort_config(exporter=exporter), 1).run(state)  # its runtime is built as load() does
    assert ("rerecorded" in res.details) == (exporter == "dynamo")  # torchscript: no longer merged
    for name in ("conv1", "layer1.0.conv1", "layer1.0.conv2"):
        assert not state.model.get_submodule(name).bias.any()  # the folded shifts, snapped to 0
    save_snapshot(state, tmp_path / "m")
    assert torch.equal(outputs(state.runner), outputs(compress_cli.load(tmp_path / "m")))


def test_onnxruntime_int8_checkpoint_recorded_on_merged_initializers_still_loads(tmp_path):
    """A checkpoint written while the exporter merged equal parameters (before the fix above) has
    its scales recorded on that graph: load() exports that way again when the graph differs."""
    state = tiny_shift_state(tmp_path)
    with export.merging_equal_initializers():
        Quantize(ort_config(), 1).run(state)
    save_snapshot(state, tmp_path / "m")
    assert torch.equal(outputs(state.runner), outputs(compress_cli.load(tmp_path / "m")))


@pytest.mark.cuda  # torchao weight-only kernels need CUDA
def test_int8_weight_only_on_cuda_reloads_equal(tmp_path):
    r = recipe(
        tmp_path, [{"type": "quantize", "scheme": "int8_weight_only"}], device="cuda", model="zoo:digits_mlp"
    )
    state = build_state(r, torch.device("cuda"), tmp_path / "out")
    res = Quantize(QuantizeConfig(type="quantize", scheme="int8_weight_only"), 1).run(state)
    assert res.details["device"].startswith("cuda")
    save_snapshot(state, tmp_path / "m")
    x = X.cuda()
    assert torch.equal(outputs(state.runner, x), outputs(compress_cli.load(tmp_path / "m"), x))


def test_excluded_layers_stay_float(tmp_path):
    import onnx

    state, res, d = run_stage(tmp_path / "ort", scheme="onnxruntime_int8", exclude=["fc"])
    inits = {i.name for i in onnx.load(res.details["onnx_file"]).graph.initializer}
    assert "conv1.weight_quantized" in inits and "fc.weight_quantized" not in inits
    state, res, d = run_stage(
        tmp_path / "dyn", model="zoo:digits_mlp", scheme="int8_dynamic", exclude=["fc3"]
    )
    assert res.details["layers"] == ["fc1", "fc2"] and isinstance(compress_cli.load(d).fc3, nn.Linear)


def test_recipe_as_run_validates_again(tmp_path):
    from compress_cli.config.yaml import recipe_to_yaml

    r = recipe(tmp_path, [{"type": "quantize", "scheme": "int8_static", "calibration_batches": 4}])
    again = validate(parse_yaml(recipe_to_yaml(r)))  # every default written out, e.g. epochs: 1
    assert again.stages[0].calibration_batches == 4 and again.stages[0].scheme == "int8_static"


def test_int8_static_fx_fallback_is_eager_int8_and_reloads_equal(tmp_path):
    state, res, d = run_stage(tmp_path, scheme="int8_static", backend="fx", calibration_batches=2)
    assert res.details["backend"] == "fx" and res.details["runtime"] == "torch-eager"
    assert res.details["quantized_weights"] == 3 and res.details["sqnr_db"] >= 30
    loaded = compress_cli.load(d)
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in loaded.modules())
    assert torch.equal(outputs(state.runner), outputs(loaded))


def test_reduce_range_can_be_forced(tmp_path):
    state, res, d = run_stage(tmp_path, scheme="onnxruntime_int8", reduce_range=True)
    assert res.details["reduce_range"] is True and res.details["reduce_range_reason"] == "set in the recipe"
    assert state.transforms[-1]["reduce_range"] is True and res.details["sqnr_db"] >= 20
    assert torch.equal(outputs(state.runner), outputs(compress_cli.load(d)))


@pytest.mark.parametrize("scheme", ["onnxruntime_int8", "bf16"])
def test_resume_after_quantize_restores_the_runtime(tmp_path, scheme):
    import shutil

    from compress_cli.engine.run import run_recipe

    d = tiny_recipe_dict(
        tmp_path,
        stages=[{"type": "quantize", "scheme": scheme}, {"type": "evaluate"}],
        model={"source": "zoo:digits_cnn"},
        data={"limit_train": 256},
        measure={"latency": None},
    )
    r = validate(parse_yaml(yaml.safe_dump(d)))
    first = run_recipe(r)
    shutil.rmtree(tmp_path / "out" / "stages" / "02-evaluate")  # as if killed during the evaluate stage
    again = run_recipe(r, resume=True)
    assert again["resumed_after_stage"] == 1
    for key in ("accuracy", "loss", "runtime", "size_bytes"):
        assert again["stages"][1]["metrics"][key] == first["stages"][1]["metrics"][key], key
    y = outputs(compress_cli.load(tmp_path / "out" / "model"))
    assert torch.equal(y, outputs(compress_cli.load(tmp_path / "out" / "stages" / "01-quantize" / "model")))


CHANNELS_LAST = '''
import torch
from torch import nn


class Net(nn.Module):
    """nn.Linear over channels-last activations, as ConvNeXt does: the TorchScript ONNX exporter
    stores that weight transposed, as an initializer named onnx::MatMul_N."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.pw = nn.Linear(8, 8)
        self.head = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        x = self.pw(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(torch.relu(x).flatten(1))

'''


def ort_int8_on(tmp_path, monkeypatch, name: str, source: str):
    """Quantize the ``Net`` defined by ``source`` (a module file written to tmp_path) with
    onnxruntime_int8."""
    (tmp_path / f"{name}.py").write_text(source + "\n\ndef build(num_classes=10):\n    return Net()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return run_stage(tmp_path, model=f"{name}:build", scheme="onnxruntime_int8", calibration_batches=2)


def test_onnxruntime_int8_stores_weights_the_exporter_transposed(tmp_path, monkeypatch):
    state, res, d = ort_int8_on(tmp_path, monkeypatch, "cl_net", CHANNELS_LAST)
    import onnx

    fp32, _ = fp32_onnx(state.model, [1, 8, 8])
    assert any(i.name.startswith("onnx::MatMul") for i in onnx.load_from_string(fp32).graph.initializer)
    assert res.details["quantized_tensors"] >= 3
    assert torch.equal(outputs(state.runner), outputs(compress_cli.load(d, trust_source=True)))


def test_fp32_onnx_leaves_the_model_as_it_was(monkeypatch):
    """No copy for a CPU fp32 model (a 500M-parameter model cannot spare one), yet its train/eval
    modes come back; a model in another dtype is exported from an fp32 copy."""
    import copy

    from compress_cli.testing import tiny_cnn

    copies = []
    deepcopy = copy.deepcopy
    monkeypatch.setattr(export.copy, "deepcopy", lambda o, *a: copies.append(o) or deepcopy(o, *a))
    x = torch.randn(3, 1, 8, 8)
    for dtype, copied in ((torch.float32, 0), (torch.float64, 1)):
        copies.clear()
        model = tiny_cnn().to(dtype).train()
        next(iter(model.children())).eval()  # mixed modes: each module's own comes back
        modes = {n: m.training for n, m in model.named_modules()}
        before = {k: v.clone() for k, v in model.state_dict().items()}
        fp32, _ = fp32_onnx(model, [1, 8, 8])
        assert sum(o is model for o in copies) == copied
        assert {n: m.training for n, m in model.named_modules()} == modes
        assert all(
            torch.equal(v, before[k]) and v.dtype == before[k].dtype for k, v in model.state_dict().items()
        )
        with torch.no_grad():
            want = model.eval()(x.to(dtype)).float()
        assert torch.allclose(OrtModule(fp32)(x), want, atol=1e-4)


def test_pack_array_keeps_scalars_scalar():
    import numpy as np

    # ONNX Runtime's QLinearAveragePool refuses a [1]-shaped scale ("Scale and Zero-point must be a
    # scalar"): densenet's transition pools failed on reload before this held
    for a in (np.float32(0.5), np.array(3, dtype=np.uint8), np.arange(6, dtype=np.int8).reshape(2, 3)):
        back = unpack_array(pack_array(a))
        assert (
            back.shape == np.asarray(a).shape
            and back.dtype == np.asarray(a).dtype
            and np.array_equal(back, a)
        )


DERIVED = '''
import torch
from torch import nn


class Net(nn.Module):
    """A bias gathered from a table by a constant index (as Swin's relative-position bias): the ONNX
    exporter folds table[index] into an initializer that is no parameter of the model."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 16)
        self.table = nn.Parameter(torch.randn(32))
        self.register_buffer("index", torch.arange(16) * 2)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        h = self.fc(torch.relu(self.conv(x)).flatten(1)) + self.table[self.index]
        return self.head(torch.relu(h))

'''


def test_onnxruntime_int8_with_constants_derived_from_parameters_reloads_exactly(tmp_path, monkeypatch):
    state, res, d = ort_int8_on(tmp_path, monkeypatch, "derived_net", DERIVED)
    assert res.details.get("derived_constants", 0) >= 1, "the folded table[index] constant is quantized"
    assert torch.equal(outputs(state.runner), outputs(compress_cli.load(d, trust_source=True)))


CONSTANT_MLP = '''
import torch
from torch import nn


class Block(nn.Module):
    """Swin v2's continuous position bias: an MLP applied to a constant coordinate table (a buffer
    every block holds with the same values, so the exporter shares one initializer through Identity)."""

    def __init__(self):
        super().__init__()
        coords = torch.stack(torch.meshgrid(torch.arange(-3.0, 4), torch.arange(-3.0, 4), indexing="ij"), -1)
        self.register_buffer("table", coords.unsqueeze(0) / 3)
        self.cpb = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1, bias=False))
        self.fc = nn.Linear(49, 49)

    def forward(self, x):
        return torch.relu(self.fc(x) + self.cpb(self.table).flatten())


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.up = nn.Linear(64, 49)
        self.blocks = nn.Sequential(Block(), Block(), Block())
        self.head = nn.Linear(49, 10)

    def forward(self, x):
        return self.head(self.blocks(self.up(self.conv(x).flatten(1))))

'''


def test_onnxruntime_int8_leaves_constant_subgraphs_in_float(tmp_path, monkeypatch):
    state, res, d = ort_int8_on(tmp_path, monkeypatch, "cpb_net", CONSTANT_MLP)
    assert torch.equal(outputs(state.runner), outputs(compress_cli.load(d, trust_source=True)))


# --------------------------------------------------------------------------- issue 15: any forward
@pytest.mark.parametrize(("scheme", "cfg"), [("int8_static", {"compile": False}), ("onnxruntime_int8", {})])
def test_forward_fx_cannot_trace_quantizes_and_reloads_equal(tmp_path, scheme, cfg):
    """``if x.dim() == 3`` in forward (torch.fx: "symbolically traced variables cannot be used as
    inputs to control flow"): BN folds by module pattern, the conversion passes its preflight,
    and load() gives back the measured model."""
    model = "compress_cli.testing:branchy_cnn"
    r = recipe(tmp_path, [{"type": "quantize", "scheme": scheme, **cfg}], model=model)
    state = build_state(r, torch.device("cpu"), tmp_path / "out")
    stage = Quantize(QuantizeConfig(type="quantize", scheme=scheme, calibration_batches=2, **cfg), 1)
    stage.preflight(state)
    res = stage.run(state)
    assert res.details["folded_batchnorm"] == ["conv1+bn1"] and res.details["sqnr_db"] >= 20
    save_snapshot(state, tmp_path / "m")
    assert torch.equal(outputs(state.runner), outputs(compress_cli.load(tmp_path / "m", trust_source=True)))


@pytest.mark.parametrize("scheme", ["int8_static", "onnxruntime_int8", "qat"])
def test_branch_on_input_values_is_refused_by_the_preflight_with_its_line(tmp_path, scheme):
    """``if x.sum() > 0``: torch.export refuses it and the TorchScript ONNX exporter would keep one
    branch for every input. The preflight refuses before any baseline, naming the line (qat: the
    export failure)."""
    from compress_cli.engine.setup import preflight
    from compress_cli.testing import branchy_cnn

    r = recipe(tmp_path, [{"type": "quantize", "scheme": scheme}])
    state = build_state(r, torch.device("cpu"), tmp_path / "out")
    # not what the recipe's source builds (the save check says so too): only the stage's line counts
    state.model = branchy_cnn(on_values=True)
    problems = [p for p in preflight(state) if p.startswith("stages[0]")]
    assert len(problems) == 1 and problems[0].startswith(f"stages[0] (quantize): {scheme} cannot convert")
    if scheme != "qat":
        assert "testing.py" in problems[0] and "(if x.sum() > 0:)" in problems[0]
        assert "int8_dynamic" in problems[0]
    Quantize(QuantizeConfig(type="quantize", scheme="int8_dynamic"), 1).preflight(state)  # eager: fine


def test_preflight_leaves_the_state_as_it_was(tmp_path):
    r = recipe(tmp_path, [{"type": "quantize", "scheme": "onnxruntime_int8"}])
    state = build_state(r, torch.device("cpu"), tmp_path / "out")
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    rng = torch.get_rng_state()
    Quantize(QuantizeConfig(type="quantize", scheme="onnxruntime_int8"), 1).preflight(state)
    assert state.transforms == [] and state.runner is None and torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(v, before[k]) for k, v in state.model.state_dict().items())
    assert isinstance(state.model.bn1, nn.BatchNorm2d)


def test_preflight_refuses_a_model_without_dynamic_layers_and_unknown_op_types(tmp_path):
    class ConvOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 10, 8)

        def forward(self, x):
            return self.conv(x).flatten(1)

    r = recipe(tmp_path, [{"type": "quantize", "scheme": "int8_dynamic"}])
    state = build_state(r, torch.device("cpu"), tmp_path / "out")
    state.model = ConvOnly()
    with pytest.raises(StageError, match="no Linear, LSTM or Embedding layer.*int8_static or onnxrunt"):
        Quantize(QuantizeConfig(type="quantize", scheme="int8_dynamic"), 1).preflight(state)
    cfg = QuantizeConfig(type="quantize", scheme="onnxruntime_int8", op_types_to_quantize=["MatMul", "Add2"])
    with pytest.raises(StageError, match="ONNX Runtime cannot quantize Add2 in mode static"):
        Quantize(cfg, 1).preflight(state)


def test_sqnr_hints_name_only_the_keys_of_the_scheme_and_mode():
    from compress_cli.quantization.base import sqnr_way_out

    dyn = sqnr_way_out("int8_dynamic", QuantizeConfig(type="quantize", scheme="int8_dynamic"))
    # int8_dynamic: reduce_range applies (7-bit activations); it does not calibrate
    assert "calibration" not in dyn and "reduce_range: true" in dyn and "exclude" in dyn
    ort_dyn = QuantizeConfig(type="quantize", scheme="onnxruntime_int8", mode="dynamic")
    hint = sqnr_way_out("onnxruntime_int8", ort_dyn)
    assert "calibration" not in hint and "op_types_to_quantize" in hint
    static = sqnr_way_out("int8_static", QuantizeConfig(type="quantize", scheme="int8_static"))
    assert "more calibration_batches" in static and "op_types_to_quantize" not in static


def test_dynamic_mode_refuses_calibration_options(tmp_path):
    with pytest.raises(RecipeError, match="calibration_batches: not an option of mode dynamic"):
        recipe(
            tmp_path,
            [{"type": "quantize", "scheme": "onnxruntime_int8", "mode": "dynamic", "calibration_batches": 2}],
        )
    with pytest.raises(RecipeError, match="op_types_to_quantize: not an option of scheme int8_static"):
        recipe(tmp_path, [{"type": "quantize", "scheme": "int8_static", "op_types_to_quantize": ["Conv"]}])


TOKENS = '''
import torch
from torch import nn


class Net(nn.Module):
    """Digits as tokens: each pixel's intensity level indexes an embedding table (a bag of tokens)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(400, 32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        levels = (x.flatten(1).clamp(0, 1) * 5).long() + 6 * torch.arange(64)
        return self.fc(self.emb(levels).mean(1))

'''


def test_int8_dynamic_quantizes_embeddings_per_row_and_reloads_equal(tmp_path, monkeypatch):
    from compress_cli.checkpoint.codec import encode_tensor
    from compress_cli.quantization.dynamic import QuantizedEmbedding

    (tmp_path / "tok_net.py").write_text(TOKENS + "\n\ndef build(num_classes=10):\n    return Net()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    state, res, d = run_stage(tmp_path, model="tok_net:build", scheme="int8_dynamic")
    assert res.details["embeddings"] == ["emb"] and res.details["layers"] == ["fc"]
    assert res.details["sqnr_db"] >= 30
    w = state.model.emb.weight.detach()
    codes = w / (w.abs().amax(1, keepdim=True) / 127)
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().amax(1).round().eq(127).all()
    meta, _ = encode_tensor("emb.weight", w)
    assert "rowgrid" in meta["enc"]  # stored as int8 codes + a scale per row: 1 byte per weight
    assert isinstance(state.runner.model.emb, QuantizedEmbedding)
    loaded = compress_cli.load(d, trust_source=True)
    assert isinstance(loaded.emb, QuantizedEmbedding) and loaded.emb.qweight.dtype == torch.int8
    assert torch.equal(outputs(state.runner), outputs(loaded))


def test_onnxruntime_int8_dynamic_mode_measures_in_ort_and_reloads_equal(tmp_path):
    import onnx

    state, res, d = run_stage(tmp_path, model="zoo:digits_mlp", scheme="onnxruntime_int8", mode="dynamic")
    assert res.details["mode"] == "dynamic" and "calibration_batches" not in res.details
    ops = {n.op_type for n in onnx.load(res.details["onnx_file"]).graph.node}
    assert "DynamicQuantizeLinear" in ops and res.details["sqnr_db"] >= 25
    assert state.transforms[-1]["mode"] == "dynamic"
    assert torch.equal(outputs(state.runner), outputs(compress_cli.load(d)))


# --------------------------------------------------------------------------- structured inputs
@pytest.mark.parametrize(
    "cfg",
    [
        {"scheme": "int8_dynamic"},
        {"scheme": "onnxruntime_int8", "calibration_batches": 2},
        {"scheme": "onnxruntime_int8", "mode": "dynamic"},
        {"scheme": "fp16"},
    ],
    ids=["int8_dynamic", "ort_static", "ort_dynamic", "fp16"],
)
def test_quantize_stage_on_a_dict_input_model_reloads_equal(tmp_path, cfg):
    """tiny BERT fed dict batches (int64 ids and masks: they must stay integers) through the stage:
    the SQNR gate reads the task-selected output, the entry records the input spec instead of an
    input shape, and compress_cli.load() rebuilds a model with the same outputs."""
    from bert_state import SOURCE, bert_state

    from compress_cli.testing import bert_inputs

    state = bert_state(tmp_path)
    stage = Quantize(QuantizeConfig(type="quantize", **cfg), 1)
    stage.preflight(state)
    res = stage.run(state)
    d = tmp_path / "out" / "model"
    save_snapshot(state, d)
    manifest = compress_cli.checkpoint.read_manifest(d)
    assert manifest["model"]["source"] == SOURCE and manifest["input_shape"] == []
    assert [t["name"] for t in manifest["input_spec"]["tensors"]] == ["input_ids", "attention_mask"]
    if cfg["scheme"] != "fp16":
        entry = state.transforms[-1]
        assert "input_shape" not in entry and entry["input_spec"]["kind"] == "kwargs"
        assert res.details["sqnr_db"] >= 25
    if cfg["scheme"] == "int8_dynamic":
        assert res.details["embeddings"] and "bert.classifier" in res.details["layers"]
    runner = state.current_runner()
    loaded = compress_cli.load(d, trust_source=True)
    for batch, length in ((2, 16), (5, 9)):
        x = bert_inputs(batch, length, seed=batch)
        with torch.inference_mode():
            got, again = runner(x), loaded(**x)
        assert got.dtype == torch.float32 and got.shape == (batch, 3)
        assert torch.equal(got, again)


def test_a_conversion_far_below_the_sqnr_gate_is_refused_by_the_preflight(tmp_path, monkeypatch):
    """A trial conversion whose output is far from fp32's (lcnet_050 at random init: activations
    ~1e-6 round to zero, -0.1 dB) is refused before the baseline; here the trial runtime returns
    zeros, as that model's did."""
    from compress_cli.engine.setup import preflight
    from compress_cli.quantization import handler

    r = recipe(tmp_path, [{"type": "quantize", "scheme": "int8_static", "compile": False}])
    state = build_state(r, torch.device("cpu"), tmp_path / "out")
    h = type(handler("int8_static"))
    real = h.trial

    def zeros(self, model, job):
        runtime = real(self, model, job)
        return lambda x: torch.zeros_like(runtime(x))

    monkeypatch.setattr(h, "trial", zeros)
    problems = [p for p in preflight(state) if p.startswith("stages[0]")]
    assert len(problems) == 1 and "trial conversion calibrated on 8 samples gives output SQNR" in problems[0]
    # an all-zero output is 0 dB: refused even where the gate minus the slack is below 0 dB
    cfg = {"type": "quantize", "scheme": "int8_static", "compile": False, "min_sqnr_db": 5.0}
    low = recipe(tmp_path, [cfg])
    assert [p for p in preflight(build_state(low, torch.device("cpu"), tmp_path / "o2")) if "SQNR 0.0" in p]
    monkeypatch.setattr(h, "trial", real)
    assert not [p for p in preflight(state) if p.startswith("stages[0]")]  # the real trial passes


def test_the_preflight_trial_is_scored_on_samples_it_was_not_calibrated_on(tmp_path, monkeypatch):
    """lcnet_050: scored on its own two calibration samples the trial said 8.1 dB, on others 2.5 dB;
    the run's gate, too, scores on data the conversion was not calibrated on."""
    from compress_cli.quantization import handler
    from compress_cli.quantization.base import PREFLIGHT_SAMPLES

    r = recipe(tmp_path, [{"type": "quantize", "scheme": "int8_static", "compile": False}])
    state = build_state(r, torch.device("cpu"), tmp_path / "out")
    h = type(handler("int8_static"))
    real, seen = h.trial, {"scored": []}

    def spy(self, model, job):
        seen["calibrated"] = torch.cat(job.calibration())
        runtime = real(self, model, job)

        def run(x):
            seen["scored"].append(x)
            return runtime(x)

        return run

    monkeypatch.setattr(h, "trial", spy)
    Quantize(QuantizeConfig(type="quantize", scheme="int8_static", compile=False), 1).preflight(state)
    calibrated, scored = seen["calibrated"], torch.cat(seen["scored"])
    assert len(calibrated) == len(scored) == PREFLIGHT_SAMPLES
    assert not any(torch.equal(a, b) for a in calibrated for b in scored)


def test_activations_below_the_smallest_int8_scale_are_refused_without_slack(tmp_path, monkeypatch):
    """The classifier's input scaled to ~1e-7 (its weights scaled up to keep the logits): those
    activations sit at the quantizer's smallest scale whatever the calibration, so a trial below
    min_sqnr_db is refused up front even where the noise slack would let it through (lcnet_050)."""
    import compress_cli.quantization.base as base
    from compress_cli.quantization.pt2e import activations_at_min_scale

    r = recipe(tmp_path, [{"type": "quantize", "scheme": "int8_static", "compile": False}])
    state = build_state(r, torch.device("cpu"), tmp_path / "out")
    with torch.no_grad():
        state.model.bn2.weight.mul_(1e-7)
        state.model.bn2.bias.mul_(1e-7)
        state.model.fc.weight.mul_(1e7)
    monkeypatch.setattr(base, "PREFLIGHT_SQNR_SLACK_DB", 1000.0)  # the slack alone refuses nothing
    cfg = QuantizeConfig(type="quantize", scheme="int8_static", compile=False, min_sqnr_db=40.0)
    with pytest.raises(StageError) as e:
        Quantize(cfg, 1).preflight(state)
    msg = str(e.value)
    assert "below min_sqnr_db 40.0, and" in msg and "span fewer than 255 steps of the smallest int8" in msg
    assert "scheme onnxruntime_int8" in msg and "more calibration_batches" not in msg
    qparams = {
        "000 x": {"param": None, "scale": pack_array(np.array([1e-3], np.float32))},
        "001 y": {"param": None, "scale": pack_array(np.array([np.finfo(np.float32).eps], np.float32))},
        "002 w": {"param": "fc.weight", "scale": pack_array(np.array([1e-9], np.float32))},
    }
    assert activations_at_min_scale(qparams) == ["001 y"]
