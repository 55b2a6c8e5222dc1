"""Text data sources (``text``: CSV/JSONL/TXT files; ``hf_datasets``: local ``datasets`` files or
a saved folder) tokenised with the model's own tokenizer, callables yielding dicts, and unlabelled
data: refused by classification, accepted by fidelity end to end on a tiny Hugging Face model.

The text is generated here (``conftest.sentences``: "the ADJ ANIMAL VERB", labelled by animal)."""

from __future__ import annotations

import sys

import pytest
import torch

import compress_cli
from compress_cli.config.recipe import DataConfig
from compress_cli.errors import SourceError
from compress_cli.sources.data import build_data


def text_data(root, **kwargs) -> DataConfig:
    return DataConfig(source="text", root=str(root), kwargs={"max_length": 12, **kwargs}, batch_size=8)


def test_jsonl_labels_are_names_mapped_in_sorted_order(hf_dir, corpus):
    b = build_data(text_data(corpus / "texts.jsonl"), seed=0, model_source=f"hf:{hf_dir}")
    assert b.labelled and b.num_classes == 3 and b.input_shape == ()
    assert len(b.train_dataset) + len(b.val_dataset) + len(b.test_dataset) == 60
    assert len(b.test_dataset) == 15  # data.test_fraction 0.25 of the pool
    batch = next(iter(b.loader("train", shuffle=False)))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["input_ids"].shape == (8, 12) and batch["labels"].dtype == torch.long  # padded to max_length
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    for ids, label in zip(batch["input_ids"], batch["labels"], strict=True):
        animal = ("bird", "cat", "dog")[int(label)]  # the names in sorted order
        assert animal in tok.decode(ids, skip_special_tokens=True).split()


def test_csv_gives_the_same_data_as_jsonl(hf_dir, corpus):
    a, c = (
        build_data(text_data(corpus / f"texts.{x}"), seed=0, model_source=f"hf:{hf_dir}")
        for x in ("jsonl", "csv")
    )
    for split in ("train", "test"):
        ba, bc = next(iter(a.loader(split, shuffle=False))), next(iter(c.loader(split, shuffle=False)))
        assert all(torch.equal(ba[k], bc[k]) for k in ba)


def test_txt_is_unlabelled(hf_dir, corpus):
    b = build_data(text_data(corpus / "texts.txt"), seed=0, model_source=f"hf:{hf_dir}")
    assert not b.labelled and b.num_classes is None
    assert len(b.train_dataset) + len(b.val_dataset) + len(b.test_dataset) == 60  # blank lines skipped
    assert "labels" not in next(iter(b.loader("test")))
    task = b.get_task()  # classification: needs labels
    with pytest.raises(SourceError, match="task classification needs labels but the data has none"):
        task.check_output(torch.zeros(2, 3), task.split(b.first_batch(2))[1])


def test_split_files_limits_and_a_tokenizer_of_its_own(hf_dir, tmp_path, sentences):
    import json

    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sentences(40, seed=1)))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sentences(20, seed=2)))
    cfg = DataConfig(
        source="text",
        root=str(tmp_path),  # finds train.jsonl and test.jsonl
        limit_train=20,
        limit_test=10,
        val_fraction=0.2,
        kwargs={"tokenizer": str(hf_dir), "max_length": 8},
    )
    b = build_data(cfg, seed=0)  # no model source: the tokenizer is given
    assert (len(b.train_dataset), len(b.val_dataset), len(b.test_dataset)) == (20, 5, 10)
    assert next(iter(b.loader("test")))["input_ids"].shape[1] == 8


def test_hf_datasets_from_files_and_from_a_saved_folder(hf_dir, corpus, tmp_path, sentences):
    import datasets

    files = DataConfig(source="hf_datasets", kwargs={"files": str(corpus / "texts.csv"), "max_length": 12})
    a = build_data(files, seed=0, model_source=f"hf:{hf_dir}")
    t = build_data(text_data(corpus / "texts.csv"), seed=0, model_source=f"hf:{hf_dir}")
    assert a.num_classes == 3
    assert torch.equal(next(iter(a.loader("test")))["input_ids"], next(iter(t.loader("test")))["input_ids"])
    saved = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(sentences(30, 3)),
            "test": datasets.Dataset.from_list(sentences(10, 4)),
        }
    )
    saved.save_to_disk(str(tmp_path / "saved"))
    b = build_data(
        DataConfig(source="hf_datasets", root=str(tmp_path / "saved")), seed=0, model_source=f"hf:{hf_dir}"
    )
    assert len(b.test_dataset) == 10 and len(b.train_dataset) + len(b.val_dataset) == 30
    assert next(iter(b.loader("test")))["input_ids"].shape[1] == 128  # the default max_length


def test_located_errors(hf_dir, corpus, tmp_path, monkeypatch):
    model = f"hf:{hf_dir}"
    with pytest.raises(
        SourceError, match="row 1 has no column 'sentence' \\(data.kwargs.text_key; columns: text, label\\)"
    ):
        build_data(text_data(corpus / "texts.csv", text_key="sentence"), seed=0, model_source=model)
    with pytest.raises(SourceError, match="no column 'topic' \\(data.kwargs.label_key"):
        build_data(text_data(corpus / "texts.jsonl", label_key="topic"), seed=0, model_source=model)
    with pytest.raises(SourceError, match="data.root .*missing does not exist"):
        build_data(text_data(tmp_path / "missing"), seed=0, model_source=model)
    with pytest.raises(SourceError, match="needs a tokenizer: set data.kwargs.tokenizer"):
        build_data(text_data(corpus / "texts.txt"), seed=0, model_source="zoo:digits_mlp")
    with pytest.raises(SourceError, match="unknown data.kwargs \\['max_len'\\]"):
        build_data(
            DataConfig(source="text", root=str(corpus), kwargs={"max_len": 3}), seed=0, model_source=model
        )
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(
        SourceError, match=r"hf_datasets: needs the datasets package: pip install compress-cli\[hf\]"
    ):
        build_data(DataConfig(source="hf_datasets", root=str(corpus)), seed=0, model_source=model)


def dict_splits(labelled: bool = True, n: int = 40):
    """A callable data source whose samples are dicts (labelled) or bare tensors (unlabelled)."""

    class Dicts(torch.utils.data.Dataset):
        def __init__(self, size: int, offset: int):
            g = torch.Generator().manual_seed(offset)
            self.x = torch.randn(size, 5, generator=g)
            self.y = torch.arange(size) % 2

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int):
            return {"features": self.x[i], "labels": self.y[i]} if labelled else self.x[i]

    return {"train": Dicts(n, 0), "test": Dicts(n // 2, 1)}


def test_callables_yielding_dicts_or_bare_inputs_are_split_and_limited():
    source = f"{__name__}:dict_splits"
    b = build_data(DataConfig(source=source, limit_train=20, limit_test=8, val_fraction=0.2), seed=0)
    assert b.labelled and b.num_classes == 2 and b.input_shape == ()
    assert (len(b.train_dataset), len(b.val_dataset), len(b.test_dataset)) == (20, 5, 8)
    assert set(next(iter(b.loader("train")))) == {"features", "labels"}
    u = build_data(DataConfig(source=source, limit_test=8, kwargs={"labelled": False}), seed=0)
    assert not u.labelled and u.num_classes is None and u.input_shape == (5,)
    assert len(u.test_dataset) == 8


def text_recipe(write_recipe, hf_dir, corpus, stem: str, **overrides):
    return write_recipe(
        stages=[{"type": "evaluate"}],
        model={"source": f"hf:{hf_dir}", **overrides.pop("model", {})},
        data={"source": "text", "root": str(corpus / stem), "kwargs": {"max_length": 12}, "batch_size": 8},
        measure={"latency": None},
        **overrides,
    )


def test_unlabelled_text_runs_with_fidelity_and_is_refused_by_classification(
    write_recipe, hf_dir, corpus, tmp_path
):
    refused = text_recipe(write_recipe, hf_dir, corpus, "texts.txt", task={"type": "classification"})
    with pytest.raises(SourceError, match="task classification needs labels but the data has none"):
        compress_cli.run(refused, force=True)
    ok = text_recipe(
        write_recipe,
        hf_dir,
        corpus,
        "texts.txt",
        name="fidelity.yaml",
        task={"type": "fidelity", "output": "mean_pool"},
    )
    report = compress_cli.run(ok, force=True)
    assert report["final"]["task"] == "fidelity" and report["final"]["scores"]["cosine"] == pytest.approx(1.0)
    loaded = compress_cli.load(tmp_path / "out" / "model")
    assert type(loaded).__name__ == "BertModel"


def test_the_model_directory_carries_its_tokenizer(write_recipe, hf_dir, corpus, tmp_path):
    """A model from ``hf:DIR`` is saved with DIR's tokenizer beside the manifest (not counted in the
    size on disk): the compressed directory is deployable, and text data finds the tokenizer there
    first when the model source is the compressed directory."""
    from transformers import AutoTokenizer

    from compress_cli.checkpoint import checkpoint_size
    from compress_cli.sources.hf import tokenizer_dir

    report = compress_cli.run(
        text_recipe(write_recipe, hf_dir, corpus, "texts.txt", task={"type": "fidelity"}), force=True
    )
    out = tmp_path / "out" / "model"
    assert (out / "tokenizer_config.json").is_file() and tokenizer_dir(str(out)) == str(out)
    assert report["final"]["size_bytes"] == checkpoint_size(out)
    text = "the quick brown fox jumps"
    want = AutoTokenizer.from_pretrained(str(hf_dir))(text)["input_ids"]
    assert AutoTokenizer.from_pretrained(str(out))(text)["input_ids"] == want


def test_labelled_text_classifier_reloads_with_the_reported_accuracy(write_recipe, hf_dir, corpus, tmp_path):
    """A sequence classifier built on the tiny BERT (hf_class, num_labels) scored on labelled text;
    compress_cli.load() of the run's model gives the accuracy the report measured."""
    from compress_cli.config.recipe import TaskConfig
    from compress_cli.runtime.measure import evaluate
    from compress_cli.runtime.runners import EagerRunner
    from compress_cli.tasks import build_task

    model = {"kwargs": {"hf_class": "AutoModelForSequenceClassification", "num_labels": 3}}
    report = compress_cli.run(
        text_recipe(write_recipe, hf_dir, corpus, "texts.jsonl", model=model), force=True
    )
    loaded = compress_cli.load(tmp_path / "out" / "model")
    data = build_data(text_data(corpus / "texts.jsonl"), seed=0, model_source=f"hf:{hf_dir}")
    scores = evaluate(
        EagerRunner(loaded, torch.device("cpu")), data.loader("test"), build_task(TaskConfig(), 3)
    )
    assert scores["accuracy"] == report["final"]["accuracy"] and scores["loss"] == pytest.approx(
        report["final"]["loss"]
    )
