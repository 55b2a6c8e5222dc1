"""``timm:NAME`` and ``hf:PATH`` model sources: the grammar, building, the weights they ship, the
manifest that rebuilds them without the original files, and the refusals (custom code, a missing
directory, a missing extra)."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

import compress_cli
from compress_cli.checkpoint import read_manifest, save_model
from compress_cli.config.recipe import ModelConfig
from compress_cli.errors import SourceError
from compress_cli.sources.models import build_from_source, load_model
from compress_cli.sources.spec import check_model_source, manifest_source_problem, parse_model_source

#: a timm ResNet-18 narrowed to 91k parameters (timm passes these kwargs to the ResNet constructor)
TINY_RESNET = {"num_classes": 4, "layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "stem_width": 8}


def test_grammar_is_checked_without_building():
    assert parse_model_source("timm:resnet18").kind == "timm"
    assert parse_model_source("hf:/some/dir").name == "/some/dir"
    assert check_model_source("hf:/not/there") is None  # validation reads no files
    assert "e.g. timm:resnet18" in (check_model_source("timm:") or "")
    assert "e.g. hf:" in (check_model_source("hf:") or "")
    # built-in kinds: a model directory may name them without being trusted
    assert manifest_source_problem("timm:resnet18", False) is None
    assert manifest_source_problem("hf:/some/dir", False) is None


def test_timm_source_builds_without_download():
    m = build_from_source({"source": "timm:resnet18", "kwargs": {**TINY_RESNET, "num_classes": 7}})
    assert m.fc.out_features == 7 and m.fc.in_features == 64
    a, b = (build_from_source({"source": "timm:resnet18", "kwargs": TINY_RESNET}) for _ in range(2))
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    with pytest.raises(SourceError, match="unknown timm model.*did you mean 'resnet18'"):
        build_from_source({"source": "timm:resnet81"})
    with pytest.raises(SourceError, match="bad model.kwargs"):
        build_from_source({"source": "timm:resnet18", "kwargs": {"nope": 1}})
    old = build_from_source(
        {"source": "timm:create_model", "kwargs": {"model_name": "resnet18", **TINY_RESNET}}
    )
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), old.state_dict().values(), strict=True)
    )
    with pytest.raises(SourceError, match="model.kwargs.checkpoint_path: timm would read"):
        build_from_source({"source": "timm:resnet18", "kwargs": {"checkpoint_path": "/tmp/evil.pth"}})
    with pytest.raises(SourceError, match="model.kwargs.pretrained: must be true or false"):
        build_from_source({"source": "timm:resnet18", "kwargs": {"pretrained": "yes"}})


@pytest.mark.parametrize(
    ("source", "module", "extra"), [("timm:resnet18", "timm", "timm"), ("hf:x", "transformers", "hf")]
)
def test_missing_extra_names_the_install(monkeypatch, source, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(SourceError, match=rf"pip install compress-cli\[{extra}\]"):
        build_from_source({"source": source})


def test_hf_source_loads_the_directory_weights(hf_dir):
    from transformers import AutoModel

    model, spec = load_model(ModelConfig(source=f"hf:{hf_dir}"))
    ref = AutoModel.from_pretrained(hf_dir).eval()
    assert type(model).__name__ == "BertModel" and next(model.parameters()).dtype == torch.float32
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True)
    )
    # the spec carries the config: the architecture is rebuilt from it alone
    assert spec["kwargs"]["hf_config"]["hidden_size"] == 32
    built = build_from_source(json.loads(json.dumps(spec)))
    assert built.state_dict().keys() == model.state_dict().keys()


def test_hf_class_picks_the_head_and_kwargs_update_the_config(hf_dir):
    model, _ = load_model(
        ModelConfig(
            source=f"hf:{hf_dir}",
            kwargs={"hf_class": "AutoModelForSequenceClassification", "num_labels": 3},
        )
    )
    assert type(model).__name__ == "BertForSequenceClassification" and model.classifier.out_features == 3
    with pytest.raises(
        SourceError, match=r"model.kwargs.hf_class names 'AutoModelForSequenceClasification'.*did you mean"
    ):
        build_from_source(
            {"source": f"hf:{hf_dir}", "kwargs": {"hf_class": "AutoModelForSequenceClasification"}}
        )


def test_hf_refusals_are_located(hf_dir, tmp_path):
    with pytest.raises(SourceError, match="is not a directory.*local_files_only: false"):
        build_from_source({"source": f"hf:{tmp_path / 'missing'}"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="config.json is missing"):
        build_from_source({"source": f"hf:{tmp_path / 'empty'}"})
    with pytest.raises(SourceError, match="model.kwargs.trust_remote_code"):
        build_from_source({"source": f"hf:{hf_dir}", "kwargs": {"trust_remote_code": True}})
    custom = tmp_path / "custom"
    shutil.copytree(hf_dir, custom)
    cfg = json.loads((custom / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (custom / "config.json").write_text(json.dumps(cfg))
    (custom / "modeling_evil.py").write_text("raise SystemExit('ran code from a model directory')\n")
    with pytest.raises(SourceError, match="names custom code"):
        load_model(ModelConfig(source=f"hf:{custom}"))


def test_hf_manifest_needs_no_original_directory(hf_dir, tmp_path):
    """An edited HF model (one encoder layer dropped, weights pruned) saved against its source and
    rebuilt by compress_cli.load() after the source directory is gone."""
    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    model, spec = load_model(ModelConfig(source=f"hf:{src}"))
    model.encoder.layer = torch.nn.ModuleList([model.encoder.layer[1]])
    with torch.no_grad():
        w = model.encoder.layer[0].intermediate.dense.weight
        w[w.abs() < w.abs().median()] = 0
    save_model(model, tmp_path / "out", base=build_from_source(spec), model_spec=spec, input_shape=[])
    shutil.rmtree(src)
    assert read_manifest(tmp_path / "out")["model"]["source"] == f"hf:{src}"
    loaded = compress_cli.load(tmp_path / "out")
    ids = torch.randint(5, 1000, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    with torch.no_grad():
        want = model.eval()(input_ids=ids, attention_mask=mask).last_hidden_state
        got = loaded(input_ids=ids, attention_mask=mask).last_hidden_state
    assert len(loaded.encoder.layer) == 1 and torch.equal(got, want)


def test_timm_run_prunes_and_reloads_from_the_manifest(write_recipe, tmp_path):
    """compress run on a timm model (prune), then compress_cli.load() of its output gives the
    accuracy the report measured, on the same test split."""
    from compress_cli.config.recipe import DataConfig, TaskConfig
    from compress_cli.runtime.measure import evaluate
    from compress_cli.runtime.runners import EagerRunner
    from compress_cli.sources.data import build_data
    from compress_cli.tasks import build_task

    model = {"source": "timm:resnet18", "kwargs": TINY_RESNET, "input_shape": [3, 32, 32]}
    data = {
        "source": "synthetic",
        "num_classes": 4,
        "kwargs": {"train_size": 32, "test_size": 24},
        "batch_size": 16,
    }
    path = write_recipe(
        stages=[{"type": "prune", "sparsity": 0.6}], model=model, data=data, measure={"latency": None}
    )
    report = compress_cli.run(path, force=True)
    model_dir = tmp_path / "out" / "model"
    assert read_manifest(model_dir)["model"]["source"] == "timm:resnet18"
    loaded = compress_cli.load(model_dir)
    assert type(loaded).__name__ == "ResNet"
    zeros = sum(int((m.weight == 0).sum()) for m in loaded.modules() if isinstance(m, torch.nn.Conv2d))
    assert zeros > 0  # the pruned weights, not a fresh model
    bundle = build_data(DataConfig(**data, input_shape=[3, 32, 32]), seed=0)
    task = build_task(TaskConfig(), bundle.num_classes)
    scores = evaluate(EagerRunner(loaded, torch.device("cpu")), bundle.loader("test"), task)
    assert scores["accuracy"] == pytest.approx(report["final"]["accuracy"], abs=1e-9)


def test_drop_layers_removes_a_bert_encoder_layer_and_it_reloads(hf_dir, tmp_path):
    """BERT's encoder layers live in an nn.ModuleList, called in a loop with the attention mask and
    more: each is a candidate, replaced by a PassThrough (nn.Identity takes one argument), proven
    exact, and the manifest rebuilds the model with it."""
    from compress_cli.checkpoint.modules import PassThrough
    from compress_cli.pruning import drop_layers, find_candidates

    model, spec = load_model(ModelConfig(source=f"hf:{hf_dir}"))
    ids = torch.randint(5, 1000, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    x = {"input_ids": ids, "attention_mask": mask}
    cands = find_candidates(model.eval(), x)
    got = [(c.name, c.kind, c.replacement) for c in cands]
    # the last layer may be taken for an output layer (output_layers matches output storage)
    assert got[0] == ("encoder.layer.0", "layer", "passthrough")
    assert all(n.startswith("encoder.layer.") and r == "passthrough" for n, _, r in got)
    with torch.no_grad():
        after_first = model.encoder.layer[0](model.embeddings(input_ids=ids), None)
    _, chosen, check = drop_layers(model, x, [(x, None)], criterion="similarity", count=1)
    assert len(chosen) == 1 and check.exact
    assert isinstance(model.get_submodule(chosen[0].name), PassThrough)
    assert torch.equal(PassThrough()(after_first, None, cache=None), after_first)
    save_model(model, tmp_path / "out", base=build_from_source(spec), model_spec=spec, input_shape=[])
    (entry,) = read_manifest(tmp_path / "out")["architecture"]
    assert entry["path"] == chosen[0].name and entry["class"] == "PassThrough"
    loaded = compress_cli.load(tmp_path / "out")
    with torch.no_grad():
        want = model.eval()(**x).last_hidden_state
        assert torch.equal(loaded(**x).last_hidden_state, want)
