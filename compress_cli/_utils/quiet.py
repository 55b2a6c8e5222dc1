"""Silence third-party libraries (warnings, logging, stdout) around a call: stages never print."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Within the block: warnings ignored, logging below ERROR dropped, stdout discarded.

    torch.ao, torchao, torch.onnx and ONNX Runtime's quantizer print progress and deprecation
    notes on every call; the CLI is the one place that talks to the terminal."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)
