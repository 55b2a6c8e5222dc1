"""Fixtures of the source tests: a tiny Hugging Face BERT directory with its own WordPiece
tokenizer (no download: built and saved here), and a labelled text corpus generated here."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

#: the words of the generated sentences; the label is the animal
ANIMALS = ("cat", "dog", "bird")
ADJECTIVES = ("red", "blue", "small", "big")
VERBS = ("runs", "sleeps", "sings", "eats")


def save_tiny_bert(directory: Path, seed: int = 0) -> Path:
    """A 2-layer BERT (hidden 32, 4 heads, vocabulary 1000) saved with save_pretrained, plus a
    WordPiece tokenizer over the corpus words (lower case letters as fallback pieces)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", *ANIMALS, *ADJECTIVES, *VERBS]
    words += list("abcdefghijklmnopqrstuvwxyz0123456789.,") + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=1000
        )
        BertModel(cfg).save_pretrained(directory)
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(directory)
    return directory


def _sentences(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` generated sentences ``the ADJ ANIMAL VERB`` labelled with their animal (a string)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        animal = rng.choice(ANIMALS)
        out.append({"text": f"the {rng.choice(ADJECTIVES)} {animal} {rng.choice(VERBS)}", "label": animal})
    return out


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT + tokenizer directory, shared by the tests (read only)."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same 60 labelled sentences as texts.jsonl, texts.csv and texts.txt (no labels)."""
    import csv

    d = tmp_path_factory.mktemp("corpus")
    rows = _sentences(60)
    (d / "texts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with (d / "texts.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows)
    (d / "texts.txt").write_text("".join(r["text"] + "\n\n" for r in rows))
    return d


@pytest.fixture(scope="session")
def sentences():
    """``sentences(n, seed)``: n generated sentences ``the ADJ ANIMAL VERB``, labelled by animal."""
    return _sentences
