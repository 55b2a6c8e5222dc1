"""Imports every built-in task module so each registers itself."""

from compress_cli.tasks import classification, fidelity  # noqa: F401
