from __future__ import annotations

import json
import subprocess
import sys
import time

from typer.testing import CliRunner

from compress_cli.cli import app

runner = CliRunner()


def test_help_is_fast_and_imports_no_torch():
    code = (
        "import sys, time; t=time.perf_counter(); from compress_cli.cli import app; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "compress_cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "run" in res.stdout
    assert time.perf_counter() - t0 < 5  # generous for a loaded CI box; measured ~0.3 s (see benchmarks)


def test_validate_ok_and_bad(write_recipe, tmp_path):
    good = write_recipe(stages=[{"type": "finetune", "epochs": 1}])
    res = runner.invoke(app, ["validate", str(good)])
    assert res.exit_code == 0, res.output
    assert "ok" in res.output
    bad = write_recipe(stages=[{"type": "finetune", "epocs": 1}], name="bad.yaml")
    res = runner.invoke(app, ["validate", str(bad)])
    assert res.exit_code == 2
    assert "bad.yaml:" in res.output and "epocs: unknown key (did you mean 'epochs'?)" in res.output
    assert "Traceback" not in res.output


def test_validate_does_not_import_torch(write_recipe):
    good = write_recipe(stages=[{"type": "finetune", "epochs": 1}])
    code = (
        "import sys; from typer.testing import CliRunner; from compress_cli.cli import app;"
        f"r = CliRunner().invoke(app, ['validate', {str(good)!r}]); "
        "print(r.exit_code, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "False"]


def test_validate_with_model_dry_run(write_recipe):
    good = write_recipe(stages=[{"type": "finetune", "epochs": 1}])
    res = runner.invoke(app, ["validate", str(good), "--model"])
    assert res.exit_code == 0, res.output
    assert "parameters" in res.output and "1. finetune" in res.output


def test_run_json_prints_only_the_report(write_recipe):
    path = write_recipe(stages=[{"type": "evaluate"}])
    res = runner.invoke(app, ["run", str(path), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["stages"][0]["type"] == "evaluate"


def test_run_exit_codes(write_recipe, tmp_path):
    path = write_recipe(stages=[{"type": "evaluate"}])
    assert runner.invoke(app, ["run", str(path), "-q"]).exit_code == 0
    res = runner.invoke(app, ["run", str(path), "-q"])
    assert res.exit_code == 2 and "--force" in res.output
    res = runner.invoke(app, ["run", str(path), "-q", "--force", "--set", "guard.max_latency_ms=0.000001"])
    assert res.exit_code == 3 and "guard.max_latency_ms" in res.output
    res = runner.invoke(app, ["run", str(path), "--force", "--set", "stages.0.type=evalute"])
    assert res.exit_code == 2 and "did you mean 'evaluate'" in res.output
    res = runner.invoke(app, ["run", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and "recipe file not found" in res.output
    res = runner.invoke(app, ["run", str(path), "--force", "--device", "cuda:7"])
    assert res.exit_code == 2 and "CUDA" in res.output


def test_runtime_failure_is_exit_1_with_one_line(write_recipe, tmp_path):
    ckpt = tmp_path / "broken.pt"
    ckpt.write_bytes(b"not a checkpoint")
    path = write_recipe(
        stages=[{"type": "evaluate"}], model={"source": "zoo:digits_mlp", "checkpoint": str(ckpt)}
    )
    res = runner.invoke(app, ["run", str(path)])
    assert res.exit_code == 1
    assert "broken.pt" in res.output and "corrupt" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()  # nothing written for a bad input


def test_stages_lists_and_describes():
    res = runner.invoke(app, ["stages"])
    assert res.exit_code == 0 and "finetune" in res.output
    res = runner.invoke(app, ["stages", "finetune"])
    assert res.exit_code == 0 and "weight_decay" in res.output and "scheduler" in res.output
    res = runner.invoke(app, ["stages", "finetun"])
    assert res.exit_code == 2 and "did you mean 'finetune'" in res.output


def test_schema_is_json():
    res = runner.invoke(app, ["schema"])
    assert res.exit_code == 0
    assert "stages" in json.loads(res.stdout)["properties"]


def test_inspect_model_dir_and_state_dict(write_recipe, tmp_path):
    from compress_cli.testing import save_tiny_checkpoint

    pt = save_tiny_checkpoint(tmp_path / "m.pt")
    res = runner.invoke(app, ["inspect", str(pt)])
    assert res.exit_code == 0 and "fc1.weight" in res.output
    path = write_recipe(stages=[{"type": "evaluate"}], measure={"latency": None})
    runner.invoke(app, ["run", str(path), "-q"])
    res = runner.invoke(app, ["inspect", str(tmp_path / "out" / "model")])
    assert res.exit_code == 0 and "compressed model" in res.output
    res = runner.invoke(app, ["inspect", str(tmp_path / "nothing")])
    assert res.exit_code == 1 and "no such file" in res.output
