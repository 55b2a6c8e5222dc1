"""MLflow tracking: a run logged to a file store and (in CI) to a real ``mlflow server``, read back
through ``MlflowClient``; ``--resume`` continues the same MLflow run; a dead server is a warning."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from compress_cli.cli import app
from compress_cli.testing import tiny_recipe_dict
from compress_cli.tracking import PARAM_LIMIT, flatten, git_commit, recipe_params, tracking_uri, truncate

mlflow = pytest.importorskip("mlflow")

STAGES = [{"type": "prune", "sparsity": 0.5}, {"type": "evaluate"}]


def _recipe(tmp_path: Path, tracking: dict | None = None) -> Path:
    d = tiny_recipe_dict(tmp_path, stages=STAGES, data={"limit_train": 200, "limit_test": 200})
    if tracking is not None:
        d["tracking"] = tracking
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(uri))


def _check_logged(uri: str, run_id: str) -> None:
    """What a tracked run of STAGES must hold: params, metric history per stage, tags, artifacts."""
    client = _client(uri)
    run = client.get_run(run_id)
    params = run.data.params
    assert params["name"] == "test"
    assert params["stages.0.type"] == "prune" and params["stages.0.sparsity"] == "0.5"
    assert params["measure.latency.batch_sizes"] == "[1, 32]"
    history = client.get_metric_history(run_id, "accuracy")
    assert sorted(m.step for m in history) == [0, 1, 2]  # baseline, prune, evaluate
    assert [m.step for m in client.get_metric_history(run_id, "sparsity") if m.value > 0.4] == [1, 2]
    assert run.data.metrics["final.accuracy"] == pytest.approx(
        client.get_metric_history(run_id, "accuracy")[-1].value
    )
    tags = run.data.tags
    assert tags["guard"] == "passed" and tags["compress.version"] and tags["final.runtime"] == "torch-eager"
    assert run.info.status == "FINISHED"
    assert tags.get("mlflow.source.git.commit") == git_commit()  # the tests run in a checkout, or not
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"report.json", "report.md", "report.png", "recipe.yaml", "model"} <= top
    assert any(a.path.endswith("manifest.json") for a in client.list_artifacts(run_id, "model"))


def test_file_store_run_is_logged_and_resume_continues_it(tmp_path, monkeypatch):
    uri = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this test's own client
    path = _recipe(tmp_path, {"mlflow": {"uri": uri, "experiment": "compress-test"}})
    res = CliRunner().invoke(app, ["run", str(path)])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "out" / "tracking.json").read_text())
    assert f"run {saved['run_id']}" in res.output
    _check_logged(uri, saved["run_id"])

    res = CliRunner().invoke(app, ["run", str(path), "-q", "--resume"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "out" / "tracking.json").read_text())["run_id"] == saved["run_id"]
    client = _client(uri)
    exp = client.get_experiment_by_name("compress-test")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [saved["run_id"]]  # the same run, not a second one
    assert runs[0].info.status == "FINISHED"


@pytest.mark.skipif(not os.environ.get("COMPRESS_TEST_MLFLOW_URI"), reason="no MLflow server (.ci/run)")
def test_real_server_gets_params_metrics_and_artifacts(tmp_path):
    """Against the server .ci/run starts (scripts/start_mlflow.sh), through --track."""
    uri = os.environ["COMPRESS_TEST_MLFLOW_URI"]
    path = _recipe(tmp_path)
    res = CliRunner().invoke(app, ["run", str(path), "--track", uri])
    assert res.exit_code == 0, res.output
    run_id = json.loads((tmp_path / "out" / "tracking.json").read_text())["run_id"]
    assert "/#/experiments/" in res.output and run_id in res.output
    _check_logged(uri, run_id)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_dead_server_is_a_warning_and_the_run_completes(tmp_path):
    path = _recipe(tmp_path)
    res = CliRunner().invoke(app, ["run", str(path), "--track", f"mlflow://127.0.0.1:{_closed_port()}"])
    assert res.exit_code == 0, res.output
    assert "warning: MLflow tracking at http://127.0.0.1:" in res.output
    assert "the run goes on untracked" in res.output
    assert (tmp_path / "out" / "report.json").is_file() and (tmp_path / "out" / "model").is_dir()
    assert not (tmp_path / "out" / "tracking.json").exists()


def test_without_mlflow_a_located_error_says_how_to_install(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "mlflow" else real(n, *a))
    path = _recipe(tmp_path, {"mlflow": {"uri": "mlflow://127.0.0.1:5000"}})
    res = CliRunner().invoke(app, ["run", str(path)])
    assert res.exit_code == 2
    line = path.read_text().splitlines().index("  mlflow:") + 1
    assert f"{path}:{line}: tracking.mlflow: MLflow is not installed" in res.output
    assert "pip install 'compress-cli[mlflow]'" in res.output
    res = CliRunner().invoke(app, ["run", str(_recipe(tmp_path)), "--track", "mlflow://h:1"])
    assert res.exit_code == 2 and "--track mlflow://h:1: tracking.mlflow" in res.output
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_bad_tracking_uri_is_a_recipe_error(tmp_path):
    path = _recipe(tmp_path, {"mlflow": {"uri": "localhost:5000", "colour": "red"}})
    res = CliRunner().invoke(app, ["validate", str(path)])
    assert res.exit_code == 2
    assert "tracking.mlflow.uri" in res.output and "mlflow://HOST:PORT" in res.output
    assert "tracking.mlflow.colour" in res.output


def test_params_are_flat_and_within_mlflow_limit(tmp_path):
    assert flatten({"a": {"b": 1, "n": None}, "s": [{"t": "x"}], "l": [1, 2]}) == {
        "a.b": "1",
        "s.0.t": "x",
        "l": "[1, 2]",
    }
    long = "x" * (PARAM_LIMIT + 50)
    cut = truncate(long)
    assert len(cut) == PARAM_LIMIT and "truncated from 6050 chars" in cut
    from compress_cli.stages.registry import load_recipe

    r, _ = load_recipe(_recipe(tmp_path))
    params = recipe_params(r)
    assert params["stages.1.type"] == "evaluate" and all(len(v) <= PARAM_LIMIT for v in params.values())
    assert tracking_uri("mlflow://h:5000") == "http://h:5000"


def test_python_api_tracks_too_and_warns_when_the_server_is_down(tmp_path):
    import compress_cli

    path = _recipe(tmp_path, {"mlflow": {"uri": f"http://127.0.0.1:{_closed_port()}"}})
    with pytest.warns(RuntimeWarning, match="MLflow tracking at http://127.0.0.1:.*goes on untracked"):
        report = compress_cli.run(path)
    assert report["final"]["accuracy"] is not None and (tmp_path / "out" / "model").is_dir()
