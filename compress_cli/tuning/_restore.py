"""Put a model back exactly as it was after measurement runs that train it (the lr range test and
the batch-size probe): weights, buffers such as batch-norm statistics, train/eval mode, gradients
and the random number generators."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Restore ``model``'s parameters, buffers, train/eval mode, gradients and every RNG afterwards."""
    import numpy as np
    import torch

    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    modes = {name: m.training for name, m in model.named_modules()}
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = (
        [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    )
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                model.load_state_dict(saved)
            for name, m in model.named_modules():
                m.training = modes.get(name, m.training)
            for p in model.parameters():
                p.grad = None
            random.setstate(py_state)
            np.random.set_state(np_state)
