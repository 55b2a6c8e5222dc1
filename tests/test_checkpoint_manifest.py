"""A manifest is untrusted data: every field is checked before anything acts on it, each problem
one located line; an oversized or inconsistent manifest fails fast without allocating what it asks
for, and nothing is written."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import compress_cli
from compress_cli.checkpoint import save_model
from compress_cli.errors import SourceError
from compress_cli.sources.models import build_from_source
from compress_cli.testing import tiny_mlp

SPEC = {"source": "zoo:digits_mlp", "kwargs": {}}


@pytest.fixture
def model_dir(tmp_path) -> Path:
    d = tmp_path / "m"
    save_model(tiny_mlp(), d, base=build_from_source(SPEC), model_spec=SPEC, input_shape=[1, 8, 8])
    return d


def edit(d: Path, change) -> None:
    manifest = json.loads((d / "manifest.json").read_text())
    change(manifest)
    (d / "manifest.json").write_text(json.dumps(manifest))


def linear(path: str, n_in: int, n_out: int) -> dict:
    return {
        "path": path,
        "class": "Linear",
        "args": {"in_features": n_in, "out_features": n_out, "bias": True},
    }


BAD = {
    "oversized Linear": (
        lambda m: m["architecture"].append(linear("fc1", 10**6, 10**6)),
        r"architecture entry 'fc1' does not match the weights: fc1\.weight \[1000000, 1000000\]",
    ),
    "patched tensor larger than stored": (
        lambda m: m["architecture"].append(
            {"path": "fc1", "class": "__patch__", "args": {"attrs": {}, "tensors": {"weight": [2**30, 64]}}}
        ),
        r"fc1\.weight \[1073741824, 64\] \(stored \[128, 64\]\)",
    ),
    "int past the bound": (
        lambda m: m["architecture"].append(linear("fc1", 2**40, 4)),
        r"architecture\[0\]\.args\.in_features: out of range",
    ),
    "unknown module class": (
        lambda m: m["architecture"].append({"path": "fc1", "class": "os.system", "args": {}}),
        r"architecture\[0\]\.class: module class 'os\.system' is not one this version can rebuild",
    ),
    "a loader argument": (
        lambda m: m["architecture"].append({**linear("fc1", 64, 128), "args": {"device": "cuda"}}),
        r"architecture\[0\]\.args\.device: not an argument a manifest may give",
    ),
    "argument the class does not take": (
        lambda m: m["architecture"].append(
            {**linear("fc1", 64, 128), "args": {"in_features": 64, "out_features": 128, "bogus": 1}}
        ),
        r"architecture entry 'fc1' \(Linear\): args\.bogus: not an argument of Linear",
    ),
    "class of a package a manifest may not name": (
        lambda m: m["architecture"].append({"path": "fc1", "class": "subprocess:Popen", "args": {}}),
        r"architecture\[0\]\.class: module class 'subprocess:Popen' is from package 'subprocess'",
    ),
    "class of the model source's package, which is built-in": (
        lambda m: m["architecture"].append({"path": "fc1", "class": "compress_cli.testing:Net", "args": {}}),
        r"architecture\[0\]\.class: module class 'compress_cli\.testing:Net' is from package",
    ),
    "private class path": (
        lambda m: m["architecture"].append({"path": "fc1", "class": "torch.nn:_Private", "args": {}}),
        r"architecture\[0\]\.class: module class 'torch\.nn:_Private' is not one this version can rebuild",
    ),
    "an allowed package's object that is not a module class": (
        lambda m: m["architecture"].append({"path": "fc1", "class": "torch.nn.functional:relu", "args": {}}),
        r"architecture entry 'fc1' \(torch\.nn\.functional:relu\): module class .* is not one this",
    ),
    "non-plain argument": (
        lambda m: m["architecture"].append({**linear("fc1", 64, 128), "args": {"in_features": {"a": 1}}}),
        r"architecture\[0\]\.args\.in_features: must be a number",
    ),
    "patch of a method": (
        lambda m: m["architecture"].append(
            {"path": "fc1", "class": "__patch__", "args": {"attrs": {"forward": 1}, "tensors": {}}}
        ),
        r"manifest patches 'forward' of module 'fc1' \(Linear\), which is not a plain attribute",
    ),
    "patch of a private attribute": (
        lambda m: m["architecture"].append(
            {"path": "fc1", "class": "__patch__", "args": {"attrs": {"__class__": "x"}, "tensors": {}}}
        ),
        r"architecture\[0\]\.args\.attrs\.__class__: not a plain attribute name",
    ),
    "deleting a parameter": (
        lambda m: m["architecture"].append({"path": "fc1.weight", "class": "__deleted__", "args": {}}),
        r"manifest edits 'fc1\.weight', which is not a module of the model source",
    ),
    "weights file outside the directory": (
        lambda m: m.update(weights="../../etc/passwd"),
        r"weights: must be weights\.safetensors\.xz or weights\.safetensors\.zst",
    ),
    "a checkpoint path": (
        lambda m: m["model"].update(checkpoint="/etc/passwd"),
        r"model\.checkpoint: must be null in a manifest",
    ),
    "a manifest that trusts itself": (
        lambda m: m["model"].update(trust_source=True),
        r"model\.trust_source: not a field of a model spec",
    ),
    "pickles allowed": (
        lambda m: m["model"].update(allow_pickle=True),
        r"model\.allow_pickle: must be false",
    ),
    "source not a string": (
        lambda m: m["model"].update(source=["zoo:digits_mlp"]),
        r"model\.source: must be",
    ),
    "kwargs not a mapping": (lambda m: m["model"].update(kwargs=[1]), r"model\.kwargs: must be a mapping"),
    "negative input size": (lambda m: m.update(input_shape=[1, -8, 8]), r"input_shape: must be a list"),
    "huge class count": (
        lambda m: m.update(num_classes=2**40),
        r"num_classes: must be null or a positive int",
    ),
    "version not a number": (lambda m: m.update(version="1"), r"version: must be a format version"),
    "transforms not entries": (lambda m: m.update(transforms="quantize"), r"transforms: must be a list"),
    "transform without a type": (lambda m: m.update(transforms=[{"scheme": "x"}]), r"transforms\[0\]\.type"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_or_inconsistent_manifests_are_located_source_errors(case, model_dir):
    change, message = BAD[case]
    edit(model_dir, change)
    before = sorted(p.name for p in model_dir.iterdir())
    t0 = time.perf_counter()
    with pytest.raises(SourceError, match=message) as e:
        compress_cli.load(model_dir)
    assert time.perf_counter() - t0 < 10  # nothing the manifest asked for was allocated
    assert all(p.startswith(str(model_dir / "manifest.json")) for p in e.value.problems)
    assert all("\n" not in p for p in e.value.problems)
    assert sorted(p.name for p in model_dir.iterdir()) == before


def test_every_problem_is_reported_at_once(model_dir):
    edit(model_dir, lambda m: m.update(input_shape="x", num_classes=-1, weights="w.bin"))
    with pytest.raises(SourceError) as e:
        compress_cli.load(model_dir)
    assert [p.split(": ")[1] for p in e.value.problems] == ["input_shape", "num_classes", "weights"]


def test_a_manifest_over_the_size_limit_is_not_parsed(model_dir):
    from compress_cli.checkpoint.manifest import MANIFEST_MAX_BYTES

    text = (model_dir / "manifest.json").read_text()
    (model_dir / "manifest.json").write_text(text[:-2] + " " * MANIFEST_MAX_BYTES + "}\n")
    with pytest.raises(SourceError, match="larger than the 16,777,216 bytes a manifest may have"):
        compress_cli.load(model_dir)


def test_json_nested_past_the_parser_is_unreadable_not_a_crash(model_dir):
    (model_dir / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SourceError, match="unreadable manifest"):
        compress_cli.load(model_dir)


def test_a_weights_index_naming_a_torch_attribute_is_corrupt(model_dir):
    """The per-tensor dtype is looked up among float dtypes, never with getattr on torch."""
    from compress_cli.checkpoint.codec import decode_tensor

    with pytest.raises(ValueError, match="not a floating-point dtype"):
        decode_tensor({"enc": "shuffle", "shape": [4], "dtype": "load"}, {})
