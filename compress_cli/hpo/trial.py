"""One hpo trial's plumbing: its copy of the state, its own random generators, what it shows of its
progress, and the epoch callback that reports to Optuna's pruner."""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress_cli.events import RunListener

if TYPE_CHECKING:
    from compress_cli.state import State


def trial_state(state: State, folder: Path, number: int) -> State:
    """A copy of ``state`` for trial ``number``: its own model, hparams, edits, transforms and
    ``folder``, progress through a :class:`TrialListener`; data, device and stop source shared."""
    from compress_cli.checkpoint import copy_model

    return replace(
        state,
        model=copy_model(state.model),
        hparams=copy.deepcopy(state.hparams),
        edits=copy.deepcopy(state.edits),
        transforms=copy.deepcopy(state.transforms),
        runner=None,
        ctx=state.ctx.for_trial(folder, TrialListener(state.ctx.listener, number)),
    )


@contextlib.contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Seed python, numpy and torch with ``seed`` inside; restore the callers' generators after."""
    import numpy as np
    import torch

    py, npst = random.getstate(), np.random.get_state()
    devices = (
        [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    )
    with torch.random.fork_rng(devices=devices):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npst)


class TrialListener(RunListener):
    """What a trial shows of its nested stages: training progress labelled ``trial N`` and the
    messages, forwarded to the run's listener; a trial's measurement stays quiet."""

    def __init__(self, base: RunListener, number: int):
        self.base = base
        self.prefix = f"trial {number} "

    def on_message(self, text: str) -> None:
        self.base.on_message(text)

    def on_epoch_start(self, label: str, epoch: int, epochs: int, steps: int) -> None:
        self.base.on_epoch_start(self.prefix + label, epoch, epochs, steps)

    def on_step(self, label: str) -> None:
        self.base.on_step(self.prefix + label)

    def on_epoch_end(self, label: str, metrics: dict[str, float]) -> None:
        self.base.on_epoch_end(self.prefix + label, metrics)

    def on_eval_step(self, samples: int) -> None:
        self.base.on_eval_step(samples)


class Pruned(Exception):
    """Raised from the epoch callback; Optuna's TrialPruned is raised from it outside the stages
    (so a wrapped stage that re-wraps exceptions cannot turn a pruning into a failure)."""


class PrunerReport:
    """The epoch callback of one trial: reports the objective's per-epoch validation value
    (``metric``: ``val_accuracy``, ``val_score``, ``val_cosine``, ...) to Optuna (single objective)
    and stops the trial when the pruner says so."""

    def __init__(self, trial: Any, single: bool, metric: str | None = "val_accuracy"):
        self.trial = trial
        self.single = single
        self.metric = metric
        self.epochs = 0
        self.pruned: str | None = None  # why the pruner stopped the trial

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        if self.metric is None or not self.single:
            return
        value = metrics.get(self.metric)
        if value is None and self.metric == "val_score":  # classification's primary is val_accuracy
            value = metrics.get("val_accuracy")
        if value is None:
            return
        self.trial.report(float(value), self.epochs)
        self.epochs += 1
        if self.trial.should_prune():
            what = "val accuracy" if self.metric == "val_accuracy" else self.metric.replace("_", " ", 1)
            self.pruned = f"pruned after epoch {self.epochs} ({what} {value:.4f})"
            raise Pruned(self.pruned)
