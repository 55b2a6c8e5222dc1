"""Mid-stage checkpoints of a ``train`` call: one file per call in ``STAGE_DIR/train/NN.pt``, holding
what the call needs to continue (model, optimizer, schedulers, AMP scaler, RNG states, counters,
early-stopping state, the loader's shuffle state and the batches consumed), written atomically and
read back with ``weights_only=True`` only when it belongs to the same recipe, stage, call, options
and tensor shapes.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

    from compress_cli.training.options import TrainOptions


#: the clock mid-epoch checkpoints are timed by (tests replace it)
_clock = time.monotonic
_FORMAT = 1


class TrainCheckpoint:
    """One ``train`` call's mid-stage checkpoint file: written atomically (temp file, fsync, rename)
    with ``torch.save`` of plain tensors, numbers, strings, lists and dicts; read back with
    ``weights_only=True`` and only when its key (recipe, stage, call, options, model shapes) matches."""

    def __init__(self, path: Path, key: str, every_s: float):
        self.path, self.key, self.every_s = path, key, every_s
        self.last = _clock()

    def due(self) -> bool:
        """Whether ``every_s`` seconds passed since the last write (or the start)."""
        return _clock() - self.last >= self.every_s

    def load(self) -> dict[str, Any] | None:
        """The saved checkpoint when it belongs to this call, else None (and this call's file goes).
        Unless this call had finished, the files of the calls after it go too: they were written
        after it stopped (a signal stops every later call at its first step) or by another config."""
        import torch

        saved = None
        if self.path.is_file():
            try:
                saved = torch.load(self.path, map_location="cpu", weights_only=True)
            except Exception:  # not ours, or unreadable: start this call over
                saved = None
            if not (
                isinstance(saved, dict) and saved.get("key") == self.key and saved.get("format") == _FORMAT
            ):
                saved = None
        if saved is not None and saved["done"]:
            return saved
        n = int(self.path.stem)
        for f in self.path.parent.glob("*.pt"):
            if f.stem.isdigit() and int(f.stem) >= n + (saved is not None):
                f.unlink(missing_ok=True)
        return saved

    def save(self, payload: dict[str, Any]) -> None:
        """Write ``payload`` (with this call's key) over the previous checkpoint, atomically."""
        import torch

        from compress_cli._utils.io import atomic_write_with

        try:
            atomic_write_with(
                self.path, lambda f: torch.save({"format": _FORMAT, "key": self.key, **payload}, f)
            )
        except OSError as e:  # a write error has no file name: name the checkpoint (the run reports it)
            raise OSError(e.errno, e.strerror or str(e), str(self.path)) from e
        self.last = _clock()


def signature(model: nn.Module, opts: TrainOptions, label: str, extra: list[Any]) -> str:
    """A digest of what a checkpoint must agree with: the options, the label, the tensors' shapes."""
    shapes = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    shapes += [list(p.shape) for p in extra]
    options = opts.model_dump(mode="json", exclude={"checkpoint_every_s"})  # timing only: may change
    text = json.dumps([options, label, shapes], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def rng_state() -> dict[str, Any]:
    """Every generator a training step may draw from (python, numpy, torch, CUDA), as plain values."""
    import random

    import numpy as np
    import torch

    version, keys, gauss = random.getstate()
    np_state: Any = np.random.get_state()  # the legacy tuple: (name, keys, pos, has_gauss, gauss)
    _, np_keys, np_pos, np_has_gauss, np_gauss = np_state
    return {
        "python": [version, list(keys), gauss],
        "numpy": [
            torch.from_numpy(np_keys.astype(np.int64)),
            int(np_pos),
            int(np_has_gauss),
            float(np_gauss),
        ],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def set_rng(saved: dict[str, Any]) -> None:
    """Put back the generators :func:`rng_state` saved."""
    import random

    import numpy as np
    import torch

    version, keys, gauss = saved["python"]
    random.setstate((version, tuple(keys), gauss))
    np_keys, np_pos, np_has_gauss, np_gauss = saved["numpy"]
    np.random.set_state(("MT19937", np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(saved["torch"])
    if saved["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])
