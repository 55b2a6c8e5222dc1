from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from compress_cli.config.recipe import ModelConfig
from compress_cli.errors import SourceError
from compress_cli.sources.models import build_from_source, load_model
from compress_cli.testing import save_tiny_checkpoint, seeded_zoo


def test_torchvision_source_with_kwargs_and_no_download():
    m = build_from_source({"source": "torchvision:resnet18", "kwargs": {"num_classes": 7}})
    assert m.fc.out_features == 7
    with pytest.raises(SourceError, match="did you mean 'resnet18'"):
        build_from_source({"source": "torchvision:resnet81"})


def test_callable_source(tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(
        "import torch.nn as nn\ndef build(width=4):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, width))\n"
        "def notamodel():\n    return 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    m = build_from_source({"source": "mymodels:build", "kwargs": {"width": 10}})
    assert m[1].out_features == 10
    with pytest.raises(SourceError, match="bad kwargs"):
        build_from_source({"source": "mymodels:build", "kwargs": {"nope": 1}})
    with pytest.raises(SourceError, match="not a torch.nn.Module"):
        build_from_source({"source": "mymodels:notamodel"})
    with pytest.raises(SourceError, match="cannot import 'nomodule_xyz'"):
        build_from_source({"source": "nomodule_xyz:build"})
    with pytest.raises(SourceError, match="has no callable 'missing'"):
        build_from_source({"source": "mymodels:missing"})


def test_same_source_same_init():
    a = build_from_source({"source": "zoo:digits_cnn"})
    b = build_from_source({"source": "zoo:digits_cnn"})
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "nested"])
def test_checkpoint_formats(tmp_path, fmt):
    ref = seeded_zoo("digits_mlp", seed=3)
    sd = ref.state_dict()
    if fmt == "pt":
        path = tmp_path / "m.pt"
        torch.save(sd, path)
    elif fmt == "nested":
        path = tmp_path / "m.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, path)
    else:
        path = tmp_path / "m.safetensors"
        save_file(dict(sd), str(path))
    model, spec = load_model(ModelConfig(source="zoo:digits_mlp", checkpoint=str(path)))
    assert spec["source"] == "zoo:digits_mlp"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "cnn.pt", name="digits_cnn")
    with pytest.raises(
        SourceError, match=r"does not match the model architecture; missing keys: .*unexpected keys: "
    ):
        load_model(ModelConfig(source="zoo:digits_mlp", checkpoint=str(path)))
    wide = seeded_zoo("digits_mlp").state_dict()
    key = next(k for k in wide if k.endswith("weight"))
    wide[key] = torch.zeros(3, 3)
    torch.save(wide, tmp_path / "wide.pt")
    with pytest.raises(SourceError, match=rf"mis-shaped: {key} \(3, 3\) vs model"):
        load_model(ModelConfig(source="zoo:digits_mlp", checkpoint=str(tmp_path / "wide.pt")))


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_malicious_pickle_does_not_run_by_default(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "x": _Evil(str(target))}, path)
    with pytest.raises(SourceError, match="allow_pickle: true"):
        load_model(ModelConfig(source="zoo:digits_mlp", checkpoint=str(path)))
    assert not target.exists()


def test_pickled_module_only_with_allow_pickle(tmp_path):
    model = seeded_zoo("digits_mlp", seed=5)
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(SourceError, match="allow_pickle"):
        load_model(ModelConfig(source="zoo:digits_mlp", checkpoint=str(path)))
    loaded, _ = load_model(ModelConfig(source="zoo:digits_mlp", checkpoint=str(path), allow_pickle=True))
    assert torch.equal(
        loaded.state_dict()["fc1.weight"]
        if "fc1.weight" in loaded.state_dict()
        else next(iter(loaded.state_dict().values())),
        model.state_dict()["fc1.weight"]
        if "fc1.weight" in model.state_dict()
        else next(iter(model.state_dict().values())),
    )


def test_truncated_checkpoints(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "m.pt")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(SourceError, match="corrupt"):
        load_model(ModelConfig(source="zoo:digits_mlp", checkpoint=str(path)))
    st = tmp_path / "m.safetensors"
    st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(SourceError, match="corrupt or truncated safetensors"):
        load_model(ModelConfig(source="zoo:digits_mlp", checkpoint=str(st)))
    with pytest.raises(SourceError, match="file not found"):
        load_model(ModelConfig(source="zoo:digits_mlp", checkpoint=str(tmp_path / "none.pt")))
