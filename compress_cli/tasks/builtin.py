"""Imports every built-in task module so each registers itself."""

from compress_cli.tasks import (  # noqa: F401
    classification,
    embedding,
    fidelity,
    multilabel,
    regression,
    segmentation,
)
