"""The accuracy budget with per-layer fallback (quantization/budget.py): the ranking, the loop's
order, where it stops, the best result kept, the config rules, and real int8 schemes through it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from compress_cli.errors import StageError
from compress_cli.quantization import Quantized, SchemeHandler, budget
from compress_cli.report import budget_lines
from compress_cli.stages.quantize import Quantize, QuantizeConfig
from compress_cli.testing import outlier_state, seeded_zoo, tiny_state

FIDELITY = {"type": "fidelity", "primary": "agreement"}


class Fake(SchemeHandler):
    """Stands in for a scheme: perturbs ``layer``'s weights by ``noise[exclude]`` (0: exact), or
    refuses."""

    def __init__(self, noise, refuse=(), layer="fc3"):
        self.noise, self.refuse, self.calls, self.layer = noise, set(refuse), [], layer

    def convert(self, state, options, label):
        key = tuple(options.exclude)
        self.calls.append(list(key))
        if key in self.refuse:
            raise StageError("SQNR too low")
        model = copy.deepcopy(state.model)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            w = model.get_submodule(self.layer).weight
            w.add_(torch.randn(w.shape, generator=g) * self.noise[key] * w.abs().max())
        state.model = model
        state.transforms.append({"type": "quantize", "scheme": options.scheme, "exclude": list(key)})
        state.runner = None
        state.edits.record(label, op="quantize")
        return Quantized(notes=f"fake {list(key)}", details={"scheme": options.scheme})


def _run(monkeypatch, noise, cap=3, refuse=(), drop=0.01):
    """A fake-int8 run on a fidelity task: the budget is in the metric's units (cosine), so 0.01."""
    state = tiny_state(task=FIDELITY, seed=0)
    fp32 = state.model
    monkeypatch.setattr(budget._Budget, "ranking", lambda self: [("fc3", 1.0), ("fc1", 2.0), ("fc2", 3.0)])
    fake = Fake(noise, refuse)
    cfg = QuantizeConfig(type="quantize", scheme="int8_dynamic", max_accuracy_drop=drop, max_float_layers=cap)
    done = budget.convert_within_budget(fake, state, cfg, "quantize")
    return state, fp32, fake, done


def test_falls_back_in_ranking_order_and_stops_within_budget(monkeypatch):
    noise = {(): 5.0, ("fc3",): 5.0, ("fc3", "fc1"): 0.0, ("fc3", "fc1", "fc2"): 0.0}
    state, _, fake, done = _run(monkeypatch, noise)
    assert fake.calls == [[], ["fc3"], ["fc3", "fc1"]]  # stops at the first step within budget
    b = done.details["budget"]
    assert b["met"] and b["float_layers"] == ["fc3", "fc1"] and b["drop"] == 0.0
    assert [s["accepted"] for s in b["steps"]] == [False, False, True]
    assert b["steps"][0]["drop"] > 0.01 and b["steps"][0]["latency_ms"] > 0
    assert not done.violations and "within max_accuracy_drop 0.01" in done.notes
    md = "\n".join(budget_lines(b))  # report.md
    assert "met with 2 layer(s) in float; float: fc3, fc1" in md
    assert "step 0, float [none]: drop" in md and "step 2, float [fc3, fc1]: drop 0.00" in md
    # the state holds that one conversion: one transform, one edit
    assert state.transforms == [{"type": "quantize", "scheme": "int8_dynamic", "exclude": ["fc3", "fc1"]}]
    assert len(state.edits.items) == 1


def test_max_float_layers_caps_the_loop_and_the_best_result_is_kept(monkeypatch):
    # more float layers make it worse here: the best is the plain conversion, not the last one
    noise = {(): 0.5, ("fc3",): 5.0}
    state, fp32, fake, done = _run(monkeypatch, noise, cap=1, drop=0.0)
    assert fake.calls == [[], ["fc3"]]
    b = done.details["budget"]
    assert not b["met"] and b["float_layers"] == [] and b["drop"] == b["steps"][0]["drop"] > 0
    assert "max_float_layers 1 reached" in b["steps"][-1]["why"]
    assert state.transforms == [{"type": "quantize", "scheme": "int8_dynamic", "exclude": []}]
    assert len(state.edits.items) == 1 and state.model is not fp32
    (v,) = done.violations
    assert v.startswith("quantize.max_accuracy_drop: int8_dynamic drops") and "max_float_layers 1" in v
    assert "NOT met" in done.notes


class FakeWithFile(Fake):
    """A Fake that, like the real schemes, writes its deployment file on every conversion."""

    def convert(self, state, options, label):
        from compress_cli.runtime.runners import EagerRunner

        done = super().convert(state, options, label)
        state.model.tag = repr(tuple(options.exclude))
        state.runner = EagerRunner(state.model, torch.device("cpu"))
        done.artifacts = self.save(state.model, state, done.details)
        return done

    def save(self, runtime, state, details):
        path = state.ctx.output_dir / "model.fake"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(runtime.tag)
        return [str(path)]


def test_the_kept_results_deployment_file_is_the_one_left_on_disk(monkeypatch):
    """The best step is the plain conversion, the last one put fc3 in float: the file on disk is
    the kept result's, not the last step's."""
    state = tiny_state(task=FIDELITY, seed=0)
    monkeypatch.setattr(budget._Budget, "ranking", lambda self: [("fc3", 1.0)])
    fake = FakeWithFile({(): 0.5, ("fc3",): 5.0})
    cfg = QuantizeConfig(type="quantize", scheme="int8_dynamic", max_accuracy_drop=0.0, max_float_layers=1)
    done = budget.convert_within_budget(fake, state, cfg, "quantize")
    assert fake.calls == [[], ["fc3"]] and done.details["budget"]["float_layers"] == []
    (path,) = done.artifacts
    assert Path(path).read_text() == "()" and state.model.tag == "()"


def test_a_refused_conversion_is_a_step_and_the_fallback_recovers_it(monkeypatch):
    noise = {("fc3",): 0.0}
    _, _, fake, done = _run(monkeypatch, noise, refuse=[()])
    b = done.details["budget"]
    assert fake.calls == [[], ["fc3"]] and b["met"]
    assert b["steps"][0]["why"] == "refused: SQNR too low" and "drop" not in b["steps"][0]


def test_nothing_converted_is_a_stage_error_and_the_state_is_untouched(monkeypatch):
    state = tiny_state(task=FIDELITY)
    fp32 = state.model
    monkeypatch.setattr(budget._Budget, "ranking", lambda self: [("fc3", 1.0)])
    cfg = QuantizeConfig(type="quantize", scheme="int8_dynamic", max_accuracy_drop=1.0, max_float_layers=1)
    with pytest.raises(StageError, match="no conversion within max_accuracy_drop succeeded"):
        budget.convert_within_budget(Fake({}, refuse=[(), ("fc3",)]), state, cfg, "quantize")
    assert state.model is fp32 and state.transforms == [] and state.edits.items == []


def test_classification_budget_is_top1_points(monkeypatch):
    state = tiny_state({"source": "zoo:digits_cnn", "checkpoint": "models/digits_cnn.safetensors"})
    monkeypatch.setattr(budget._Budget, "ranking", lambda self: [("fc", 1.0), ("conv2", 2.0)])
    cfg = QuantizeConfig(type="quantize", scheme="int8_static", max_accuracy_drop=0.5)
    fake = Fake({(): 2.0, ("fc",): 0.0}, layer="fc")
    b = budget.convert_within_budget(fake, state, cfg, "quantize").details["budget"]
    assert b["metric"] == "accuracy" and b["fp32_score"] > 0.9 and b["steps"][0]["drop"] > 5
    assert b["met"] and b["float_layers"] == ["fc"] and fake.calls == [[], ["fc"]]


def test_sensitivity_ranks_the_layer_that_reads_the_outlier_channel_first():
    model = seeded_zoo("outlier_cnn").eval()
    names = ["conv1", "gain", "conv2", "fc1", "fc2"]
    batches = [torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ranked = budget.layer_sensitivity(model, names, batches, lambda y, x: y)
    assert ranked[0][0] == "conv2" and ranked[0][1] + 20 < ranked[1][1]
    assert sorted(n for n, _ in ranked) == sorted(names)
    # output quantization (ONNX Runtime QDQ) charges the producer of the outlier tensor too
    both = budget.layer_sensitivity(model, names, batches, lambda y, x: y, outputs=True)
    assert {n for n, _ in both[:2]} == {"gain", "conv2"}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # model unchanged
    assert not model._forward_pre_hooks and not any(m._forward_hooks for m in model.modules())


def test_fake_quant_helpers_follow_the_int8_grid():
    w = torch.tensor([[1.0, -0.5, 0.25], [100.0, 1.0, -3.0]])
    q = budget.fake_quant_weight(w)
    assert torch.allclose(q[0], w[0], atol=1 / 127) and q[1, 0] == 100.0  # per output channel
    x = torch.linspace(0, 10, 101)
    assert (budget.fake_quant_activation(x, 0.0, 10.0) - x).abs().max() <= 10 / 255 / 2 + 1e-6
    from types import SimpleNamespace as NS

    top1, mse = (
        NS(name="classification", higher_is_better=True),
        NS(name="regression", higher_is_better=False),
    )
    assert budget.drop_points(top1, 0.9, 0.88) == 2.0  # top-1 points
    assert budget.drop_points(mse, 0.1, 0.12) == 0.02  # the metric's own units


# ------------------------------------------------------------------------------ config rules
def test_budget_on_a_scheme_without_layers_to_fall_back_is_refused_with_the_key():
    with pytest.raises(ValueError, match=r"max_accuracy_drop: not an option of scheme fp16 \(max_accura"):
        QuantizeConfig(type="quantize", scheme="fp16", max_accuracy_drop=0.5)
    with pytest.raises(ValueError, match="not an option of scheme qat"):
        QuantizeConfig(type="quantize", scheme="qat", max_accuracy_drop=0.5)
    with pytest.raises(ValueError, match="max_float_layers: only with max_accuracy_drop"):
        QuantizeConfig(type="quantize", scheme="int8_static", max_float_layers=2)
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        QuantizeConfig(type="quantize", scheme="int8_static", max_accuracy_drop=-1)
    for scheme in ("int8_dynamic", "int8_static", "onnxruntime_int8", "openvino_int8"):
        QuantizeConfig(type="quantize", scheme=scheme, max_accuracy_drop=0.5, max_float_layers=2)


def test_recipe_validation_locates_the_budget_key(tmp_path):
    from compress_cli.errors import RecipeError
    from compress_cli.stages.registry import load_recipe

    p = tmp_path / "r.yaml"
    p.write_text(
        "version: 1\nname: t\nmodel: {source: 'zoo:digits_mlp'}\n"
        "stages:\n  - type: quantize\n    scheme: fp16\n    max_accuracy_drop: 0.5\n"
    )
    with pytest.raises(RecipeError, match=r"r\.yaml:\d+: stages\[0\].*max_accuracy_drop"):
        load_recipe(p)


# ------------------------------------------------------------------------- real int8 schemes
@pytest.mark.slow  # two PT2E conversions: ~75 s on the loaded 2-core machine
def test_int8_static_recovers_the_outlier_model_by_keeping_conv2_in_float():
    state = outlier_state()
    cfg = QuantizeConfig(
        type="quantize",
        scheme="int8_static",
        compile=False,
        calibration_batches=1,
        min_sqnr_db=0,
        max_accuracy_drop=0.005,  # cosine (fidelity's units)
        max_float_layers=2,
    )
    res = Quantize(cfg, 1).run(state)
    b = res.details["budget"]
    assert b["steps"][0]["drop"] > 0.05 and b["met"] and b["float_layers"] == ["conv2"]
    assert b["sensitivity"][0]["layer"] == "conv2" and not res.violations
    assert state.transforms[-1]["exclude"] == ["conv2"]


def test_onnxruntime_int8_needs_both_sides_of_the_outlier_tensor_in_float():
    state = outlier_state()
    cfg = QuantizeConfig(
        type="quantize",
        scheme="onnxruntime_int8",
        calibration_batches=1,
        min_sqnr_db=0,
        max_accuracy_drop=0.005,  # cosine (fidelity's units)
        max_float_layers=2,
    )
    res = Quantize(cfg, 1).run(state)
    b = res.details["budget"]
    assert b["steps"][0]["drop"] > 0.05 and b["met"] and set(b["float_layers"]) == {"gain", "conv2"}
    assert len(b["steps"]) == 3 and not res.violations


def test_with_a_budget_the_preflight_leaves_a_low_sqnr_to_the_fallback(tmp_path, monkeypatch):
    """A trial far below min_sqnr_db is refused up front without a budget (see
    tests/stages/test_quantize.py); with one, the fallback may recover it: only a conversion that
    fails outright is refused."""
    from compress_cli.quantization import handler

    state = tiny_state("zoo:digits_cnn", tmp_path)
    h = type(handler("onnxruntime_int8"))
    real = h.trial

    def zeros(self, model, job):
        runtime = real(self, model, job)
        return lambda x: torch.zeros_like(runtime(x))

    monkeypatch.setattr(h, "trial", zeros)
    plain = QuantizeConfig(type="quantize", scheme="onnxruntime_int8")
    with pytest.raises(StageError, match=r"trial conversion calibrated on \d+ samples gives output SQNR"):
        Quantize(plain, 1).preflight(state)
    Quantize(plain.model_copy(update={"max_accuracy_drop": 0.5}), 1).preflight(state)


def test_under_a_budget_the_sqnr_gate_is_zero_unless_the_recipe_sets_it(monkeypatch):
    """The budget is the gate: every step converts with min_sqnr_db 0 (as the preflight does),
    unless the recipe sets min_sqnr_db."""
    seen = []

    class Gate(Fake):
        def convert(self, state, options, label):
            seen.append(options.min_sqnr_db)
            return super().convert(state, options, label)

    monkeypatch.setattr(budget._Budget, "ranking", lambda self: [("fc3", 1.0)])
    for kw, want in (({}, 0.0), ({"min_sqnr_db": 10.0}, 10.0)):
        seen.clear()
        cfg = QuantizeConfig(type="quantize", scheme="int8_dynamic", max_accuracy_drop=0.01, **kw)
        budget.convert_within_budget(Gate({(): 0.0}), tiny_state(task=FIDELITY), cfg, "quantize")
        assert seen == [want]
    plain = QuantizeConfig(type="quantize", scheme="int8_dynamic")
    assert budget.gate_options(plain) is plain  # no budget: the gate as set
