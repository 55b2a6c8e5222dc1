"""The scheme table and the handler registry: one table drives validation, the stage and load();
a scheme added by a plugin works end to end (this is CONTRIBUTING's example)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import compress_cli
from compress_cli.config.yaml import parse_yaml
from compress_cli.engine.run import run_recipe
from compress_cli.engine.setup import build_state
from compress_cli.errors import RecipeError, SourceError
from compress_cli.quantization import schemes
from compress_cli.stages.quantize import Quantize, QuantizeConfig
from compress_cli.stages.registry import json_schema, validate
from compress_cli.state import save_snapshot
from compress_cli.testing import tiny_recipe_dict

# the example of CONTRIBUTING.md's "Add a quantization scheme", run here as a third-party plugin
_DOC = (Path(__file__).resolve().parents[2] / "CONTRIBUTING.md").read_text()
PLUGIN = re.search(r"## Add a quantization scheme\n.*?```python\n(.*?)```", _DOC, re.S).group(1)


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """CONTRIBUTING's scheme as a plugin module on sys.path; unregistered again afterwards."""
    (tmp_path / "pow2_scheme.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "pow2_scheme", raising=False)
    __import__("pow2_scheme")
    yield tmp_path
    schemes.SCHEMES.pop("int8_pow2", None)
    schemes._HANDLERS.pop("int8_pow2", None)


def recipe_dict(tmp_path, scheme: str) -> dict:
    return tiny_recipe_dict(
        tmp_path,
        stages=[{"type": "quantize", "scheme": scheme}],
        model={"source": "zoo:digits_mlp"},
        data={"limit_train": 256},
        measure={"latency": None},
    )


def test_every_built_in_scheme_has_a_handler_and_valid_options():
    options = set(QuantizeConfig.model_fields)
    for name, scheme in schemes.SCHEMES.items():
        assert schemes.handler(name) is not None
        assert scheme.options <= options, name
        assert set(scheme.formats) <= set(schemes.FORMATS)


def test_unknown_scheme_in_a_manifest_is_a_source_error():
    with pytest.raises(SourceError, match="unknown quantization scheme 'int9' in the manifest"):
        schemes.handler("int9")


def test_a_plugin_scheme_validates_runs_and_reloads_exactly(plugin):
    d = recipe_dict(plugin, "int8_pow2")
    recipe = validate(parse_yaml(yaml.safe_dump(d)))
    variants = json_schema()["properties"]["stages"]["items"]["oneOf"]
    quantize = next(v for v in variants if v["properties"]["type"]["const"] == "quantize")
    assert "int8_pow2" in quantize["properties"]["scheme"]["enum"]
    state = build_state(recipe, torch.device("cpu"), plugin / "out")
    result = Quantize(recipe.stages[0], 1).run(state)
    assert result.details == {"scheme": "int8_pow2", "runtime": "torch-eager"} and state.runner is None
    save_snapshot(state, plugin / "model")
    loaded = compress_cli.load(plugin / "model")
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), state.model(x))
    assert len(torch.unique(loaded.fc1.weight[0])) <= 255
    d["stages"].append({"type": "finetune"})
    with pytest.raises(RecipeError, match=r"cannot train after stages\[0\] \(quantize\)"):
        validate(parse_yaml(yaml.safe_dump(d)))
    d["stages"] = [{"type": "quantize", "scheme": "int8_pow2", "opset": 18}]
    with pytest.raises(RecipeError, match="opset: not an option of scheme int8_pow2"):
        validate(parse_yaml(yaml.safe_dump(d)))


def test_load_finds_a_plugin_scheme_through_the_entry_points(plugin, monkeypatch):
    """A fresh process knows only the built-in schemes: load() imports the plugins for a name it lacks."""
    from compress_cli._utils import plugins

    run_recipe(validate(parse_yaml(yaml.safe_dump(recipe_dict(plugin, "int8_pow2")))))
    del schemes.SCHEMES["int8_pow2"], schemes._HANDLERS["int8_pow2"]
    del sys.modules["pow2_scheme"]
    ep = SimpleNamespace(name="pow2", value="pow2_scheme", load=lambda: __import__("pow2_scheme"))
    monkeypatch.setattr(plugins, "entry_points", lambda group: [ep] if group == plugins.GROUP else [])
    assert compress_cli.load(plugin / "out" / "model") is not None
    assert "int8_pow2" in schemes.SCHEMES


def test_load_imports_no_stage_module(tmp_path):
    """The manifest's quantize transform is provided by the quantization package, not the stage."""
    run_recipe(validate(parse_yaml(yaml.safe_dump(recipe_dict(tmp_path, "int8_dynamic")))))
    code = (
        "import sys; import compress_cli; "
        f"m = compress_cli.load({str(tmp_path / 'out' / 'model')!r}); "
        "print(type(m.fc1).__module__, sorted(k for k in sys.modules if k.startswith('compress_cli.stages')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["torch.ao.nn.quantized.dynamic.modules.linear", "[]"]


def test_validating_quantize_and_export_imports_no_torch(write_recipe):
    """The scheme table is torch-free: ``compress validate`` stays fast with quantize stages."""
    path = write_recipe(
        stages=[
            {"type": "quantize", "scheme": "qat", "epochs": 1},
            {"type": "export", "formats": ["torch_export"]},
        ]
    )
    code = (
        "import sys; from typer.testing import CliRunner; from compress_cli.cli import app; "
        f"r = CliRunner().invoke(app, ['validate', {str(path)!r}]); "
        "print(r.exit_code, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["0", "False"]
