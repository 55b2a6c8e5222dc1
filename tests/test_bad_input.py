"""Bad input: every case exits 2 (recipe/usage) or 1 (runtime) with one clear message naming the file,
line or object at fault, no traceback without --debug, and no output directory left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from compress_cli.cli import app
from compress_cli.testing import save_tiny_checkpoint, tiny_recipe_dict

runner = CliRunner()


def _recipe(tmp: Path, **over) -> dict:
    return tiny_recipe_dict(tmp, stages=over.pop("stages", [{"type": "evaluate"}]), **over)


def _ckpt(tmp: Path, kind: str) -> str:
    p = tmp / f"ckpt-{kind}"
    if kind == "missing":
        return str(tmp / "nope.pt")
    if kind == "corrupt":
        p = p.with_suffix(".pt")
        p.write_bytes(b"\x00garbage" * 10)
    elif kind == "truncated":
        p = save_tiny_checkpoint(p.with_suffix(".pt"))
        p.write_bytes(p.read_bytes()[:300])
    elif kind == "safetensors":
        p = p.with_suffix(".safetensors")
        p.write_bytes(b'\x08\x00\x00\x00\x00\x00\x00\x00{"a":1}')
    elif kind == "other_arch":
        p = save_tiny_checkpoint(p.with_suffix(".pt"), name="digits_cnn")
    elif kind == "pickled":
        p = p.with_suffix(".pt")
        torch.save(torch.nn.Linear(2, 2), p)
    elif kind == "empty":
        p = p.with_suffix(".pt")
        p.write_bytes(b"")
    return str(p)


def _model_dir_corrupt(tmp: Path) -> str:
    from compress_cli.checkpoint import save_model
    from compress_cli.sources.models import build_from_source
    from compress_cli.testing import tiny_mlp

    d = tmp / "modeldir"
    spec = {"source": "zoo:digits_mlp"}
    save_model(tiny_mlp(), d, base=build_from_source(spec), model_spec=spec, input_shape=[1, 8, 8])
    w = d / "weights.safetensors.xz"
    w.write_bytes(w.read_bytes()[:50])
    return str(d)


def _callable_data(tmp: Path, body: str) -> str:
    (tmp / "baddata.py").write_text(body)
    return "baddata:make"


# (id, how to build the recipe text or dict, extra CLI args, exit code, message regex)
RECIPE_CASES = [
    (
        "yaml-syntax",
        "version: 1\nname: x\nmodel: {source: zoo:digits_mlp\n",
        [],
        2,
        r"recipe\.yaml:\d+: YAML syntax error",
    ),
    ("not-mapping", "- 1\n- 2\n", [], 2, r"recipe\.yaml:1: the recipe must be a mapping"),
    ("empty-file", "", [], 2, r"the recipe must be a mapping"),
    ("tabs-yaml", "version: 1\n\tname: x\n", [], 2, r"recipe\.yaml:2: YAML syntax error"),
    ("unknown-top-key", {"modle": 1}, [], 2, r"recipe\.yaml:\d+: modle: unknown key"),
    (
        "unknown-stage-key",
        {"stages": [{"type": "finetune", "epocs": 1}]},
        [],
        2,
        r"stages\[0\] \(finetune\)\.epocs: unknown key \(did you mean 'epochs'\?\)",
    ),
    (
        "unknown-stage-type",
        {"stages": [{"type": "prunee"}]},
        [],
        2,
        r"stages\[0\]\.type: unknown stage type 'prunee'",
    ),
    ("seed-type", {"seed": "abc"}, [], 2, r"seed: must be a valid integer"),
    ("stages-not-list", {"stages": {"type": "evaluate"}}, [], 2, r"stages: must be a list"),
    ("stage-not-mapping", {"stages": ["evaluate"]}, [], 2, r"stages\[0\]: must be a mapping"),
    ("stage-no-type", {"stages": [{"epochs": 1}]}, [], 2, r"stages\[0\]\.type: required key is missing"),
    (
        "epochs-negative",
        {"stages": [{"type": "finetune", "epochs": -1}]},
        [],
        2,
        r"\.epochs: must be greater than or equal to 0 \(got -1\)",
    ),
    ("lr-string", {"stages": [{"type": "finetune", "lr": "fast"}]}, [], 2, r"\.lr: "),
    (
        "optimizer",
        {"stages": [{"type": "finetune", "optimizer": "lion"}]},
        [],
        2,
        r"optimizer: must be one of 'sgd', 'adam', 'adamw' \(got 'lion'\)",
    ),
    (
        "scheduler",
        {"stages": [{"type": "finetune", "scheduler": "linear"}]},
        [],
        2,
        r"scheduler: must be one of",
    ),
    (
        "lr-auto-without-finder",
        {"stages": [{"type": "finetune", "lr": "auto"}]},
        [],
        2,
        r"'auto' needs lr_find earlier",
    ),
    (
        "batch-auto-without-finder",
        {"stages": [{"type": "finetune", "batch_size": "auto"}]},
        [],
        2,
        r"'auto' needs batch_size_find",
    ),
    (
        "batch-size-zero",
        {"data": {"batch_size": 0}},
        [],
        2,
        r"data\.batch_size: must be greater than 0 \(got 0\)",
    ),
    ("val-fraction", {"data": {"val_fraction": 1.5}}, [], 2, r"data\.val_fraction: must be less than 1"),
    (
        "calibration-zero",
        {"data": {"calibration_batches": 0}},
        [],
        2,
        r"data\.calibration_batches: must be greater than 0",
    ),
    ("device-name", {"device": "gpu"}, [], 2, r"device: must be auto, cpu, cuda, cuda:N or mps"),
    ("version", {"version": 2}, [], 2, r"version: must be one of 1 \(got 2\)"),
    ("missing-model", {"model": None}, [], 2, r"model: "),
    ("bad-name", {"name": "my run/1"}, [], 2, r"name: must match pattern"),
    ("unknown-zoo", {"model": {"source": "zoo:resnet"}}, [], 2, r"model\.source: unknown zoo model 'resnet'"),
    ("bad-model-source", {"model": {"source": "resnet18"}}, [], 2, r"model\.source: expected zoo:NAME"),
    (
        "unknown-data-source",
        {"data": {"source": "cifar"}},
        [],
        2,
        r"data\.source: unknown data source 'cifar'",
    ),
    (
        "input-shape-zero",
        {"model": {"source": "zoo:digits_mlp", "input_shape": [1, 0, 8]}},
        [],
        2,
        r"input_shape: .*positive",
    ),
    (
        "latency-empty",
        {"measure": {"latency": {"batch_sizes": []}}},
        [],
        2,
        r"measure\.latency\.batch_sizes: ",
    ),
    (
        "guard-negative",
        {"guard": {"max_accuracy_drop": -1}},
        [],
        2,
        r"guard\.max_accuracy_drop: must be greater than or equal to 0",
    ),
    ("guard-action", {"guard": {"on_violation": "explode"}}, [], 2, r"guard\.on_violation: must be one of"),
    (
        "on-violation-stage",
        {"stages": [{"type": "evaluate", "on_violation": "ignore"}]},
        [],
        2,
        r"on_violation: must be one of",
    ),
    ("time-budget", {"time_budget_s": 0}, [], 2, r"time_budget_s: must be greater than 0"),
    ("set-no-equals", {}, ["--set", "seed"], 2, r"--set seed: expected key\.path=value"),
    (
        "set-bad-value",
        {},
        ["--set", "data.batch_size=-4"],
        2,
        r"--set data\.batch_size=-4: data\.batch_size: must be greater than 0",
    ),
    (
        "set-bad-index",
        {},
        ["--set", "stages.3.epochs=1"],
        2,
        r"--set stages\.3\.epochs=1: no element stages\.3",
    ),
    ("cuda-missing", {}, ["--device", "cuda"], 2, r"CUDA was requested but no CUDA device is available"),
]


@pytest.mark.parametrize("case", RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_bad_recipe(case, tmp_path):
    _, spec, args, code, pattern = case
    path = tmp_path / "recipe.yaml"
    if isinstance(spec, str):
        path.write_text(spec)
    else:
        d = _recipe(tmp_path)
        d.update(spec)
        d = {k: v for k, v in d.items() if v is not None}
        path.write_text(yaml.safe_dump(d, sort_keys=False))
    res = runner.invoke(app, ["run", str(path), *args])
    assert res.exit_code == code, res.output
    assert __import__("re").search(pattern, res.output), res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "out").exists(), "nothing may be written for a bad recipe"


RUNTIME_CASES = [
    (
        "checkpoint-missing",
        lambda t: {"model": {"source": "zoo:digits_mlp", "checkpoint": _ckpt(t, "missing")}},
        r"nope\.pt: file not found",
    ),
    (
        "checkpoint-corrupt",
        lambda t: {"model": {"source": "zoo:digits_mlp", "checkpoint": _ckpt(t, "corrupt")}},
        r"ckpt-corrupt\.pt: corrupt",
    ),
    (
        "checkpoint-truncated",
        lambda t: {"model": {"source": "zoo:digits_mlp", "checkpoint": _ckpt(t, "truncated")}},
        r"ckpt-truncated\.pt: corrupt or truncated",
    ),
    (
        "checkpoint-empty",
        lambda t: {"model": {"source": "zoo:digits_mlp", "checkpoint": _ckpt(t, "empty")}},
        r"ckpt-empty\.pt: corrupt",
    ),
    (
        "safetensors-corrupt",
        lambda t: {"model": {"source": "zoo:digits_mlp", "checkpoint": _ckpt(t, "safetensors")}},
        r"corrupt or truncated safetensors",
    ),
    (
        "checkpoint-other-arch",
        lambda t: {"model": {"source": "zoo:digits_mlp", "checkpoint": _ckpt(t, "other_arch")}},
        r"does not match the model architecture; missing keys: ",
    ),
    (
        "pickled-module",
        lambda t: {"model": {"source": "zoo:digits_mlp", "checkpoint": _ckpt(t, "pickled")}},
        r"set model\.allow_pickle: true",
    ),
    (
        "model-dir-corrupt",
        lambda t: {"model": {"source": "zoo:digits_mlp", "checkpoint": _model_dir_corrupt(t)}},
        r"weights\.safetensors\.xz: corrupt or truncated",
    ),
    (
        "wrong-input-shape",
        lambda t: {"model": {"source": "zoo:lenet5"}},
        r"does not accept the data's input shape \[1, 8, 8\]",
    ),
    (
        "num-classes-mismatch",
        lambda t: {"model": {"source": "zoo:digits_cnn", "kwargs": {"num_classes": 3}}},
        r"model outputs 3 classes but the data has 10",
    ),
    (
        "bad-model-kwargs",
        lambda t: {"model": {"source": "zoo:digits_cnn", "kwargs": {"depth": 3}}},
        r"zoo|kwargs|depth",
    ),
    (
        "model-module-missing",
        lambda t: {"model": {"source": "no_such_pkg.models:build"}},
        r"cannot import 'no_such_pkg\.models'",
    ),
    (
        "data-root-missing",
        lambda t: {"data": {"source": "fashion_mnist", "root": str(t / "nowhere")}},
        r"nowhere",
    ),
    (
        "data-empty",
        lambda t: {
            "data": {
                "source": _callable_data(
                    t,
                    "import torch\nfrom torch.utils.data import TensorDataset\n"
                    "def make():\n"
                    "    e = TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))\n"
                    "    return e, e\n",
                )
            }
        },
        r"empty",
    ),
    ("imagefolder-missing", lambda t: {"data": {"source": "imagefolder", "root": str(t)}}, r"train"),
    (
        "torchvision-no-download",
        lambda t: {"data": {"source": "torchvision:CIFAR10", "root": str(t / "cifar")}},
        r"download",
    ),
]


@pytest.mark.parametrize("case", RUNTIME_CASES, ids=[c[0] for c in RUNTIME_CASES])
def test_bad_runtime_input(case, tmp_path, monkeypatch):
    _, make, pattern = case
    monkeypatch.syspath_prepend(str(tmp_path))
    d = _recipe(tmp_path)
    d.update(make(tmp_path))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    res = runner.invoke(app, ["run", str(path)])
    assert res.exit_code == 1, res.output
    assert __import__("re").search(pattern, res.output), res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "out").exists(), "nothing may be written when the input cannot be loaded"


def test_nan_loss_stops_with_exit_1_and_keeps_the_baseline(tmp_path):
    # lr is bounded (<= 10), so the divergence comes from badly scaled weights plus the largest lr
    ck = save_tiny_checkpoint(tmp_path / "scaled.pt")
    torch.save({k: v * 1e6 for k, v in torch.load(ck).items()}, ck)
    d = _recipe(
        tmp_path,
        stages=[{"type": "finetune", "epochs": 2, "lr": 10, "optimizer": "sgd"}],
        model={"checkpoint": str(ck)},
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(d))
    res = runner.invoke(app, ["run", str(path)])
    assert (
        res.exit_code == 1
        and "stages[0] (finetune)" in res.output
        and ("loss became" in res.output or "NaN" in res.output)
    )
    assert (tmp_path / "out" / "stages" / "00-baseline" / "model" / "manifest.json").is_file()
    assert "incomplete" in (tmp_path / "out" / "report.json").read_text()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_output(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    d = _recipe(tmp_path, output=str(ro / "out"))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(d))
    res = runner.invoke(app, ["run", str(path)])
    assert res.exit_code == 2 and "not writable" in res.output


def test_output_is_a_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe(tmp_path, output=str(f))))
    res = runner.invoke(app, ["run", str(path)])
    assert res.exit_code == 2 and "exists and is not a directory" in res.output


def test_disk_full_is_a_clear_error(tmp_path, monkeypatch):
    """ENOSPC while writing snapshot 2 (its state.json, the last file of a snapshot, or its model):
    one line naming the output and the snapshot folder, exit 1; snapshot 1 intact; --resume, with
    space again, continues after stage 1."""
    import errno
    import json

    from compress_cli._utils import io

    real = io.os.fsync

    def full_at(target: str):
        def fsync(fd):  # every file the tool writes goes through atomic_write_bytes' fsync
            if f"02-evaluate{os.sep}{target}" in os.readlink(f"/proc/self/fd/{fd}"):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd)

        return fsync

    stages = [{"type": "finetune", "epochs": 1, "lr": 0.01, "max_steps_per_epoch": 3}, {"type": "evaluate"}]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe(tmp_path, stages=stages, measure={"latency": None})))
    out, snaps = tmp_path / "out", tmp_path / "out" / "stages"
    for target in (".state.json", "model"):
        monkeypatch.setattr(io.os, "fsync", full_at(target))
        res = runner.invoke(app, ["run", str(path), "--force"])
        assert res.exit_code == 1, res.output
        errors = [line for line in res.output.splitlines() if line.startswith("error:")]
        assert errors == [f"error: output {out}: No space left on device while writing stages/02-evaluate"]
        assert "Traceback" not in res.output
        assert not (snaps / "02-evaluate" / "state.json").exists()
        one = json.loads((snaps / "01-finetune" / "state.json").read_text())
        assert one["entry"]["index"] == 1 and (snaps / "01-finetune" / "model" / "manifest.json").is_file()
        monkeypatch.setattr(io.os, "fsync", real)
        res = runner.invoke(app, ["run", str(path), "--resume"])
        assert res.exit_code == 0, res.output
        assert "resuming after stage 1 of 2" in res.output
        report = json.loads((out / "report.json").read_text())
        assert report["resumed_after_stage"] == 1 and [s["type"] for s in report["stages"]] == [
            "finetune",
            "evaluate",
        ]


def test_debug_shows_the_traceback(tmp_path):
    d = _recipe(tmp_path, model={"source": "zoo:digits_mlp", "checkpoint": str(tmp_path / "nope.pt")})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(d))
    res = runner.invoke(app, ["run", str(path), "--debug"])
    assert res.exit_code == 1 and "Traceback" in res.output


def test_there_are_at_least_40_bad_input_cases():
    assert len(RECIPE_CASES) + len(RUNTIME_CASES) + 5 >= 40
