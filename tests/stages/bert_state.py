"""A pipeline state over tiny BERT and token data (dict batches), for the export and quantize stage
tests (a plain module next to them: pytest puts this folder on sys.path)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.utils.data import Dataset

from compress_cli.config.recipe import ModelConfig, TaskConfig
from compress_cli.sources.data.bundle import DataBundle
from compress_cli.tasks import build_task
from compress_cli.testing import bert_inputs, tiny_bert, tiny_state

SOURCE = "compress_cli.testing:tiny_bert"


class TokenSet(Dataset):
    """Samples ``{input_ids, attention_mask, labels}`` (3 classes) of :func:`bert_inputs` rows."""

    def __init__(self, n: int, seed: int, length: int = 16):
        self.x = bert_inputs(n, length, seed=seed)
        self.y = torch.arange(n) % 3

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "input_ids": self.x["input_ids"][i],
            "attention_mask": self.x["attention_mask"][i],
            "labels": self.y[i],
        }


def bert_state(tmp_path: Any, **recipe: Any) -> Any:
    """A CPU state whose model is :func:`tiny_bert` (source ``compress_cli.testing:tiny_bert``) and
    whose data yields dict batches of token ids, masks and labels (classification task)."""
    state = tiny_state(tmp_path=tmp_path, limit_train=64, **recipe)
    model = tiny_bert()
    state.model = model
    state.original = copy.deepcopy(model).eval()
    state.model_spec = ModelConfig(source=SOURCE)
    data = DataBundle(
        train_dataset=TokenSet(32, 1),
        val_dataset=TokenSet(16, 2),
        test_dataset=TokenSet(16, 3),
        num_classes=3,
        input_shape=(),
        batch_size=8,
        eval_batch_size=8,
        calibration_batches=2,
    )
    data.task = build_task(TaskConfig(), 3)
    state.data = data
    return state
