"""Model directories are data, never code (issue 21): a manifest naming ``package.module:callable``
is refused before anything is imported, by ``compress_cli.load``, ``compress validate --model`` and
``compress run``, unless the loader opts in; a recipe's own callable source stays allowed, snapshots
of it included."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import compress_cli
from compress_cli.checkpoint import save_model
from compress_cli.cli import app
from compress_cli.errors import SourceError
from compress_cli.sources.models import build_from_source
from compress_cli.testing import tiny_mlp, tiny_recipe_dict

SPEC = {"source": "zoo:digits_mlp", "kwargs": {}}
X = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def model_dir(tmp_path: Path, source: str, kwargs: dict | None = None) -> Path:
    """A valid digits-MLP model directory whose manifest then names ``source``."""
    d = tmp_path / "shared-model"
    save_model(tiny_mlp(), d, base=build_from_source(SPEC), model_spec=SPEC, input_shape=[1, 8, 8])
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["model"] = {"source": source, "kwargs": kwargs or {}}
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


@pytest.fixture
def importing_writes(tmp_path, monkeypatch):
    """A module ``side_effect_mlp`` on sys.path that writes a marker file when imported; its
    ``build()`` makes the digits MLP. -> the marker's path."""
    marker = tmp_path / "imported.txt"
    pkg = tmp_path / "pkgs"
    pkg.mkdir()
    (pkg / "side_effect_mlp.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from compress_cli.sources.zoo import digits_mlp as build\n"
    )
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.delitem(sys.modules, "side_effect_mlp", raising=False)
    return marker


def recipe(tmp_path: Path, source: str, **model) -> Path:
    d = tiny_recipe_dict(tmp_path, model={"source": source, **model}, measure={"latency": None})
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


def test_an_os_system_manifest_runs_nothing_anywhere(tmp_path):
    marker = tmp_path / "pwned"
    d = model_dir(tmp_path, "os:system", {"command": f"touch {marker}"})
    with pytest.raises(SourceError) as e:
        compress_cli.load(d)
    (line,) = e.value.problems
    assert line.startswith(f"{d / 'manifest.json'}: model.source 'os:system' is code")
    assert "trust_source=True" in line and "--trust-source" in line
    path = recipe(tmp_path, str(d))
    for args in (["validate", str(path), "--model"], ["run", str(path), "-q"]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 1, res.output
        assert "'os:system' is code" in res.output and "Traceback" not in res.output
    from compress_cli.cli.inspection import inspect_path

    assert inspect_path(d)["kind"] == "compressed model (os:system)"  # reading it is fine
    assert not marker.exists()


def test_a_manifest_naming_a_module_does_not_import_it_unless_trusted(tmp_path, importing_writes):
    d = model_dir(tmp_path, "side_effect_mlp:build")
    with pytest.raises(SourceError, match=r"'side_effect_mlp:build' is code"):
        compress_cli.load(d)
    assert not importing_writes.exists() and "side_effect_mlp" not in sys.modules
    loaded = compress_cli.load(d, trust_source=True)  # the opt-in: the directory's code runs
    assert importing_writes.exists()
    with torch.no_grad():
        assert torch.equal(loaded(X), tiny_mlp().eval()(X))


@pytest.mark.parametrize("opt_in", ["recipe", "cli"])
def test_a_recipe_or_the_command_line_opts_in(tmp_path, importing_writes, opt_in):
    d = model_dir(tmp_path, "side_effect_mlp:build")
    path = recipe(tmp_path, str(d), **({"trust_source": True} if opt_in == "recipe" else {}))
    flag = ["--trust-source"] if opt_in == "cli" else []
    res = CliRunner().invoke(app, ["validate", str(path), "--model", *flag])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["run", str(path), "-q", *flag])
    assert res.exit_code == 0, res.output
    assert importing_writes.exists()
    written = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    assert "trust_source" not in written["model"]  # whoever runs it again decides again


def test_a_model_dir_checkpoint_of_the_recipes_own_source_needs_no_opt_in(tmp_path, importing_writes):
    d = model_dir(tmp_path, "side_effect_mlp:build")
    res = CliRunner().invoke(
        app, ["validate", str(recipe(tmp_path, "side_effect_mlp:build", checkpoint=str(d))), "--model"]
    )
    assert res.exit_code == 0, res.output


def test_resume_restores_snapshots_of_the_recipes_own_source_but_not_planted_code(tmp_path, importing_writes):
    path = recipe(tmp_path, "side_effect_mlp:build")
    doc = yaml.safe_load(path.read_text())
    doc["stages"] = [{"type": "prune", "sparsity": 0.5}, {"type": "evaluate"}]
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = tmp_path / "out"
    assert CliRunner().invoke(app, ["run", str(path), "-q"]).exit_code == 0
    reference = json.loads((out / "report.json").read_text())["stages"][-1]["metrics"]["accuracy"]

    def resume() -> object:
        shutil.rmtree(out / "stages" / "02-evaluate")  # as if killed during the last stage
        (out / "report.json").unlink()
        return CliRunner().invoke(app, ["run", str(path), "-q", "--resume"])

    res = resume()
    assert res.exit_code == 0, res.output
    assert json.loads((out / "report.json").read_text())["stages"][-1]["metrics"]["accuracy"] == reference
    snapshot = out / "stages" / "01-prune" / "model" / "manifest.json"
    manifest = json.loads(snapshot.read_text())
    manifest["model"] = {"source": "os:system", "kwargs": {"command": f"touch {tmp_path / 'pwned'}"}}
    snapshot.write_text(json.dumps(manifest))
    res = resume()
    assert res.exit_code == 1 and "'os:system' is code" in res.output
    assert not (tmp_path / "pwned").exists()


def test_a_manifest_naming_a_path_is_refused_even_trusted(tmp_path):
    inner = model_dir(tmp_path / "a", "zoo:digits_mlp")
    d = model_dir(tmp_path / "b", str(inner))
    with pytest.raises(SourceError, match="is a path; a manifest names the model source it was built from"):
        compress_cli.load(d, trust_source=True)
