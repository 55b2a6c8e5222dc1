"""quantize scheme: auto: candidates by runtime, the choice by measurement (timings injected through
the ``timer`` seam, so the choice is deterministic), never a candidate slower than fp32, a failing
candidate as a row, the recipe's ``target`` checked with file and line."""

from __future__ import annotations

import re

import pytest
import torch
import yaml

import compress_cli
from compress_cli.config.yaml import parse_yaml
from compress_cli.engine.setup import build_state
from compress_cli.errors import RecipeError
from compress_cli.quantization import auto
from compress_cli.report import candidate_table
from compress_cli.runtime.ort import OrtModule
from compress_cli.stages.quantize import QuantizeConfig
from compress_cli.stages.registry import validate
from compress_cli.state import save_snapshot
from compress_cli.testing import outlier_state, tiny_mlp, tiny_recipe_dict

ORT = ["onnxruntime"]  # the two ONNX Runtime candidates convert in seconds; torch.compile does not


def state_for(tmp_path, model: str = "zoo:digits_mlp"):
    d = tiny_recipe_dict(tmp_path, stages=[{"type": "quantize", "scheme": "auto"}], model={"source": model})
    return build_state(validate(parse_yaml(yaml.safe_dump(d))), torch.device("cpu"), tmp_path / "out")


def timer(ms: dict[str, float]):
    def fake(runners, x):
        assert set(runners) == {auto.FP32, *ms}  # every candidate timed against the fp32 model
        return {k: ms.get(k, 1.0) / 1e3 for k in runners}

    return fake


def choose(state, budget=100.0, **ms):
    opts = QuantizeConfig(type="quantize", scheme="auto")
    return auto.choose(
        state, opts, "quantize", runtimes=ORT, batch=1, budget=budget, threads=1, timer=timer(ms)
    )


def test_candidates_by_runtime_and_model_family(monkeypatch):
    from compress_cli.runtime import openvino as ovrt

    monkeypatch.setattr(ovrt, "bf16_supported", lambda: False)
    both = ["torch", "onnxruntime", "openvino"]
    convnet = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), torch.nn.Flatten(), torch.nn.Linear(64, 10))
    assert [s for s, _, _ in auto.candidate_schemes(convnet, both)] == [
        "int8_static",
        "onnxruntime_int8",
        "onnxruntime_fp32",
        "openvino_int8",
        "openvino_fp32",
    ]
    assert ("int8_dynamic", "torch", "f32") in auto.candidate_schemes(
        tiny_mlp(), ["torch"]
    )  # Linear-dominated
    ov = [("openvino_int8", "openvino", "f32"), ("openvino_fp32", "openvino", "f32")]
    assert auto.candidate_schemes(tiny_mlp(), ["openvino"]) == ov
    assert "torch" in auto.installed_runtimes()
    # a CPU with bf16 units: the openvino schemes are candidates in bf16 too, named so in the table
    monkeypatch.setattr(ovrt, "bf16_supported", lambda: True)
    found = auto.candidate_schemes(tiny_mlp(), ["onnxruntime", "openvino"])
    assert found[2:] == [*ov, ("openvino_int8", "openvino", "bf16"), ("openvino_fp32", "openvino", "bf16")]
    assert [auto.candidate_name(s, p) for s, _, p in found[-2:]] == [
        "openvino_int8 (bf16)",
        "openvino_fp32 (bf16)",
    ]
    assert all(p == "f32" for _, r, p in found if r != "openvino")


def test_auto_keeps_the_fastest_within_budget_and_it_reloads(tmp_path):
    state = state_for(tmp_path)
    done = choose(state, onnxruntime_int8=0.5, onnxruntime_fp32=0.8)
    rows = {r["scheme"]: r for r in done.details["candidates"]}
    assert done.details["chosen"] == "onnxruntime_int8" and rows["onnxruntime_int8"]["status"] == "chosen"
    assert rows["onnxruntime_fp32"]["status"] == "slower than the chosen one"
    assert rows[auto.FP32]["latency_ms"] == 1.0 and rows["onnxruntime_int8"]["throughput"] == 2000.0
    assert all(r["size_bytes"] and r["convert_s"] > 0 for k, r in rows.items() if k != auto.FP32)
    assert [t["scheme"] for t in state.transforms] == ["onnxruntime_int8"]
    assert [e.details["scheme"] for e in state.edits.items] == ["onnxruntime_int8"]  # losers left no edit
    assert "chosen" in "\n".join(candidate_table(done.details["candidates"], done.details["primary"]))
    save_snapshot(state, tmp_path / "model")
    loaded = compress_cli.load(tmp_path / "model")
    x = state.data.example_input(3)
    assert isinstance(loaded, OrtModule) and torch.equal(loaded(x), state.runner(x))


def test_auto_never_picks_a_candidate_slower_than_fp32(tmp_path):
    state = state_for(tmp_path)
    before = state.model
    done = choose(state, onnxruntime_int8=1.2, onnxruntime_fp32=1.5)  # fp32 eager: 1.0 ms
    assert done.details["chosen"] is None and "the fp32 model stays" in done.notes
    assert state.model is before and state.transforms == [] and state.runner is None
    for r in done.details["candidates"][1:]:
        assert r["status"].startswith("slower than fp32")


def test_an_int8_candidate_slower_than_its_runtime_fp32_is_flagged_and_a_fp32_runtime_may_win(tmp_path):
    state = state_for(tmp_path)
    done = choose(state, onnxruntime_int8=0.6, onnxruntime_fp32=0.5)
    rows = {r["scheme"]: r for r in done.details["candidates"]}
    assert done.details["chosen"] == "onnxruntime_fp32"
    assert rows["onnxruntime_int8"]["status"] == "slower than onnxruntime fp32"


def test_a_candidate_over_the_budget_is_not_chosen(tmp_path, monkeypatch):
    state = state_for(tmp_path)
    monkeypatch.setattr(auto, "drop_points", lambda task, ref, v: 0.0)
    done = choose(state, budget=0.0, onnxruntime_int8=0.5, onnxruntime_fp32=0.8)
    assert done.details["chosen"] == "onnxruntime_int8"
    monkeypatch.setattr(auto, "drop_points", lambda task, ref, v: 2.5)
    done = choose(state_for(tmp_path / "b"), budget=1.0, onnxruntime_int8=0.5, onnxruntime_fp32=0.8)
    assert done.details["chosen"] is None
    assert all("drop 2.50 > budget 1" in r["status"] for r in done.details["candidates"][1:])


def test_a_failing_candidate_is_a_row_not_a_failed_stage(tmp_path, monkeypatch):
    state = state_for(tmp_path)
    real = auto.candidate_schemes
    monkeypatch.setattr(
        auto, "candidate_schemes", lambda m, r: [*real(m, r), ("no_such_scheme", "torch", "f32")]
    )
    done = choose(state, onnxruntime_int8=0.5, onnxruntime_fp32=0.8)
    row = done.details["candidates"][-1]
    assert row["scheme"] == "no_such_scheme" and row["status"].startswith("failed: ")
    assert done.details["chosen"] == "onnxruntime_int8"


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ({"scheme": "auto", "target": {"batch": 1, "runtime": ["torch"]}}, "target.runtime"),
        ({"scheme": "auto", "target": {"runtimes": ["openvno"]}}, "openvno"),
        ({"scheme": "auto", "target": {"batch": 0}}, "target.batch"),
        ({"scheme": "int8_static", "target": {"batch": 1}}, "target: only with scheme: auto"),
        ({"scheme": "auto", "calibrate_method": "entropy"}, "not an option of scheme auto"),
    ],
)
def test_target_mistakes_are_located_recipe_errors(tmp_path, stage, message):
    d = tiny_recipe_dict(tmp_path, stages=[{"type": "quantize", **stage}])
    text = yaml.safe_dump(d, sort_keys=False)
    with pytest.raises(RecipeError) as e:
        validate(parse_yaml(text))
    first = next(i for i, t in enumerate(text.splitlines(), 1) if "type: quantize" in t)
    found = re.match(r"<recipe>:(\d+): stages\[0\] \(quantize\)", str(e.value))
    assert message in str(e.value) and found and int(found[1]) >= first  # the stage's line, or the key's


# ----------------------------------------------------------- the accuracy budget on the candidates
def test_candidate_options_budget_and_sqnr_gate():
    from compress_cli.quantization.schemes import SCHEMES

    plain = QuantizeConfig(type="quantize", scheme="auto", min_sqnr_db=3)
    for scheme in ("int8_static", "onnxruntime_int8", "openvino_int8"):  # a speed-only run lowers it
        assert auto.candidate_options(plain, scheme).min_sqnr_db == 3.0
    budgeted = QuantizeConfig(type="quantize", scheme="auto", max_accuracy_drop=0.5, max_float_layers=2)
    for scheme, _, _ in auto.candidate_schemes(tiny_mlp(), list(auto.RUNTIMES)):
        o = auto.candidate_options(budgeted, scheme)
        takes = "max_accuracy_drop" in SCHEMES[scheme].options  # whichever schemes take the budget
        assert o.scheme == scheme and o.max_accuracy_drop == (0.5 if takes else None)
        assert o.min_sqnr_db == 0.0 and o.max_float_layers == 2  # the gate relaxed as for one scheme
    assert auto.candidate_options(budgeted, "onnxruntime_fp32").max_accuracy_drop is None  # no loop
    kept = budgeted.model_copy(update={"min_sqnr_db": 10.0})  # a gate the recipe sets stays
    assert auto.candidate_options(kept, "onnxruntime_int8").min_sqnr_db == 10.0


def test_a_lowered_min_sqnr_db_reaches_the_chosen_int8_candidate(tmp_path):
    state = state_for(tmp_path)
    opts = QuantizeConfig(type="quantize", scheme="auto", min_sqnr_db=3)
    t = timer({"onnxruntime_int8": 0.5, "onnxruntime_fp32": 0.8})
    done = auto.choose(state, opts, "quantize", runtimes=ORT, batch=1, budget=100.0, threads=1, timer=t)
    assert done.details["chosen"] == "onnxruntime_int8" and done.details["chosen_min_sqnr_db"] == 3.0


def _spy(monkeypatch):
    """Record the scheme and SQNR gate of every budgeted conversion and every split evaluated."""
    from compress_cli.quantization import budget
    from compress_cli.runtime import measure

    loops, splits = [], []
    real_loop, real_eval = budget.convert_within_budget, measure.evaluate

    def loop(handler, state, options, label):
        loops.append((options.scheme, options.min_sqnr_db))
        return real_loop(handler, state, options, label)

    def evaluate(*a, **kw):
        splits.append(kw.get("split"))
        return real_eval(*a, **kw)

    monkeypatch.setattr(budget, "convert_within_budget", loop)
    monkeypatch.setattr(measure, "evaluate", evaluate)
    return loops, splits


def test_auto_with_a_budget_recovers_the_int8_candidate_by_per_layer_fallback(tmp_path, monkeypatch):
    state = outlier_state(tmp_path)
    loops, splits = _spy(monkeypatch)
    opts = QuantizeConfig(type="quantize", scheme="auto", max_accuracy_drop=0.005, max_float_layers=2)
    t = timer({"onnxruntime_int8": 0.5, "onnxruntime_fp32": 0.8})
    done = auto.choose(state, opts, "quantize", runtimes=ORT, batch=1, budget=0.005, threads=1, timer=t)
    assert loops == [("onnxruntime_int8", 0.0)]  # the fp32 candidate converted once, no loop
    assert set(splits) == {"val"} and done.details["split"] == "val"  # selected on val, not test
    rows = {r["scheme"]: r for r in done.details["candidates"]}
    q = rows["onnxruntime_int8"]
    assert q["status"] == "chosen" and q["fallback_steps"] == 3
    assert set(q["float_layers"]) == {"gain", "conv2"}
    assert q["drop"] <= 0.005 and "fallback_steps" not in rows["onnxruntime_fp32"]
    assert done.details["budget"]["met"] and not done.violations and "float: " in done.notes
    assert set(state.transforms[-1]["exclude"]) == set(q["float_layers"])
    md = "\n".join(candidate_table(done.details["candidates"], "cosine", done.details["split"]))
    assert "| cosine (val) |" in md and "(3 step(s))" in md


def test_a_candidate_whose_fallback_misses_the_budget_is_rejected_not_a_violation(tmp_path, monkeypatch):
    state = outlier_state(tmp_path)
    opts = QuantizeConfig(type="quantize", scheme="auto", max_accuracy_drop=0.005, max_float_layers=1)
    t = timer({"onnxruntime_int8": 0.5, "onnxruntime_fp32": 0.8})
    done = auto.choose(state, opts, "quantize", runtimes=ORT, batch=1, budget=0.005, threads=1, timer=t)
    rows = {r["scheme"]: r for r in done.details["candidates"]}
    q = rows["onnxruntime_int8"]
    assert q["status"].startswith("max_accuracy_drop not met by the fallback: not met")
    assert q["fallback_steps"] == 2
    assert "max_float_layers 1" in q["status"] and len(q["float_layers"]) == 1
    assert done.details["chosen"] == "onnxruntime_fp32" and not done.violations  # auto picked another


def test_an_int8_candidate_is_compared_with_the_fp32_candidate_of_its_own_precision():
    """openvino_int8 in f32 is not refused for being slower than openvino_fp32 in bf16 (which
    may be over the budget): each precision has its own same-runtime fp32 row."""

    def cand(scheme, precision, ms, drop=0.0):
        c = auto.Candidate(scheme, "openvino", precision)
        c.row.update(latency=ms / 1e3, drop=drop)
        return c

    cands = [
        cand("openvino_int8", "f32", 0.4),
        cand("openvino_fp32", "f32", 0.6),
        cand("openvino_int8", "bf16", 0.35, drop=2.0),
        cand("openvino_fp32", "bf16", 0.3, drop=2.0),
    ]
    assert auto.decide(cands, 1e-3, 1.0) is cands[0]
    assert [c.row["why"] for c in cands] == [
        "",
        "",
        "slower than openvino fp32 (bf16); drop 2.00 > budget 1",
        "drop 2.00 > budget 1",
    ]
    cands[2].row["drop"] = cands[3].row["drop"] = 0.5  # within budget: the fastest, bf16 fp32, wins
    assert auto.decide(cands, 1e-3, 1.0).name == "openvino_fp32 (bf16)"


@pytest.mark.slow  # ~12 s on 2 busy cores: NNCF twice, three OpenVINO compiles, an evaluation each
def test_auto_measures_the_openvino_bf16_candidates_and_the_chosen_one_reloads(tmp_path, monkeypatch):
    """Where the CPU has bf16 units: the bf16 rows are converted and timed on the same harness,
    one chosen by the timings is recorded with its precision and load() compiles it so (the f32
    int8 row, which converts as the bf16 one does, is left out: NNCF is the slow part)."""
    from compress_cli.runtime import openvino as ovrt

    if not ovrt.bf16_supported():
        pytest.skip("this CPU has no bf16 units (OpenVINO OPTIMIZATION_CAPABILITIES)")
    real = auto.candidate_schemes
    f32_int8 = ("openvino_int8", "openvino", "f32")
    monkeypatch.setattr(auto, "candidate_schemes", lambda m, r: [c for c in real(m, r) if c != f32_int8])
    state = state_for(tmp_path)
    opts = QuantizeConfig(type="quantize", scheme="auto", calibration_batches=1)
    t = timer({"openvino_fp32": 0.8, "openvino_int8 (bf16)": 0.5, "openvino_fp32 (bf16)": 0.7})
    done = auto.choose(
        state, opts, "quantize", runtimes=["openvino"], batch=1, budget=100.0, threads=1, timer=t
    )
    rows = {r["scheme"]: r for r in done.details["candidates"]}
    assert (
        done.details["chosen"] == "openvino_int8 (bf16)"
        and rows["openvino_int8 (bf16)"]["status"] == "chosen"
    )
    assert rows["openvino_fp32 (bf16)"]["score"] is not None  # evaluated on the selection split too
    assert [t["scheme"] for t in state.transforms] == ["openvino_int8"]
    assert state.transforms[-1]["inference_precision"] == "bf16"
    save_snapshot(state, tmp_path / "model")
    loaded = compress_cli.load(tmp_path / "model")
    loaded.compile()
    assert loaded.__dict__["_compiled"].get_property("INFERENCE_PRECISION_HINT").get_type_name() == "bf16"
    x = state.data.example_input(3)
    assert torch.equal(loaded(x), state.runner(x))
