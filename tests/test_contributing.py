"""CONTRIBUTING.md stays true: the code of its "Add a stage" section runs as written.

The python blocks of a section are executed as one module; its yaml block is run as a recipe
through the public ``compress_cli.run`` and the result is reloaded with ``compress_cli.load``.
"""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch

import compress_cli
from compress_cli.stages import registry

DOC = Path(__file__).resolve().parents[1] / "CONTRIBUTING.md"


def section(heading: str) -> str:
    """The text under ``## heading`` up to the next ``## `` heading."""
    text = DOC.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"CONTRIBUTING.md has no '## {heading}' section"
    return match.group(1)


def code_blocks(text: str, lang: str) -> list[str]:
    """The bodies of the fenced ```lang blocks in ``text``, in order."""
    return re.findall(rf"^```{lang}\n(.*?)^```$", text, re.S | re.M)


@pytest.fixture
def scratch_registry():
    """Stages registered during the test are gone afterwards (other tests list every stage)."""
    registry.list_stages()
    before = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(before)


def exec_module(name: str, sources: list[str], monkeypatch) -> types.ModuleType:
    """Run ``sources`` as the body of a module importable as ``name`` (pydantic resolves the
    annotations of the classes it defines through ``sys.modules``)."""
    module = types.ModuleType(name)
    monkeypatch.setitem(sys.modules, name, module)
    exec(compile("\n".join(sources), f"CONTRIBUTING.md:{name}", "exec"), module.__dict__)
    return module


def run_recipe_text(text: str, out: Path) -> tuple[dict, torch.nn.Module]:
    """Run recipe ``text`` with its output in ``out`` -> (report, the reloaded model)."""
    out.mkdir(parents=True)
    (out / "recipe.yaml").write_text(text)
    report = compress_cli.run(out / "recipe.yaml", output=str(out / "run"))
    return report, compress_cli.load(out / "run" / "model")


def test_add_a_stage_example_runs(tmp_path, monkeypatch, scratch_registry):
    text = section("Add a stage")
    (recipe,) = code_blocks(text, "yaml")
    module = exec_module("contributing_scale_weights", code_blocks(text, "python"), monkeypatch)
    cls = registry.get_stage("scale_weights")
    assert cls is module.ScaleWeights
    assert cls.__doc__
    assert all(f.description for n, f in cls.config_class.model_fields.items() if n != "type")
    assert cls.config_class.model_validate({"type": "scale_weights", **cls.example})

    report, scaled = run_recipe_text(recipe, tmp_path / "scaled")
    stage = report["stages"][0]
    assert stage["type"] == "scale_weights"
    assert stage["notes"] == "3 layers scaled"
    assert stage["details"]["layers"] == ["fc1", "fc2", "fc3"]
    manifest = json.loads((tmp_path / "scaled" / "run" / "model" / "manifest.json").read_text())
    assert [e["op"] for e in manifest["edits"]] == ["scale_weights"]

    # the same recipe without the stage (runs are deterministic under the recipe's seed)
    _, plain = run_recipe_text(recipe.replace("  - {type: scale_weights", "  # "), tmp_path / "plain")
    for name in ("fc1", "fc2", "fc3"):
        assert torch.equal(getattr(scaled, name).weight, getattr(plain, name).weight * 0.5)
        assert torch.equal(getattr(scaled, name).bias, getattr(plain, name).bias)


def test_add_a_quantization_scheme_example_runs(tmp_path, monkeypatch, scratch_registry):
    from compress_cli.quantization import schemes

    text = section("Add a quantization scheme")
    (recipe,) = code_blocks(text, "yaml")
    try:
        exec_module("contributing_scheme", code_blocks(text, "python"), monkeypatch)
        report, model = run_recipe_text(recipe, tmp_path / "pow2")
    finally:
        schemes.SCHEMES.pop("int8_pow2", None)
        schemes._HANDLERS.pop("int8_pow2", None)
    stage = report["stages"][0]
    assert stage["type"] == "quantize" and stage["details"]["scheme"] == "int8_pow2"
    for layer in (model.fc1, model.fc2, model.fc3):
        w = layer.weight.detach()
        scale = torch.exp2(torch.ceil(torch.log2(w.abs().amax(dim=1, keepdim=True) / 127)))
        assert torch.equal(torch.round(w / scale) * scale, w)  # every weight on its row's pow2 grid


def test_add_a_task_example_runs(tmp_path, monkeypatch):
    from compress_cli.config.recipe import DataConfig
    from compress_cli.sources.data import build_data

    text = section("Add a task")
    (recipe,) = code_blocks(text, "yaml")
    module = exec_module("contributing_within_bins", code_blocks(text, "python"), monkeypatch)
    assert module.WithinBins.info()["metrics"]["within"][1] is True  # higher is better

    report, model = run_recipe_text(recipe, tmp_path / "within")
    final = report["stages"][-1]["metrics"]
    assert (final["task"], final["primary"], final["higher_is_better"]) == ("within_bins", "within", True)
    assert final["score"] == final["scores"]["within"] >= final["scores"]["accuracy"]
    assert final["metric_drop"] == pytest.approx(report["baseline"]["score"] - final["score"], abs=1e-6)

    # the reported share, counted by hand on the reloaded model over the same test split
    data = build_data(DataConfig(source="digits", limit_train=256, limit_test=256), seed=0)
    hits = exact = n = 0
    with torch.no_grad():
        for x, y in data.loader("test"):
            off = (model(x).argmax(1) - y).abs()
            hits, exact, n = hits + int((off <= 1).sum()), exact + int((off == 0).sum()), n + len(y)
    assert final["samples"] == n
    assert final["scores"] == {"within": hits / n, "accuracy": exact / n}
