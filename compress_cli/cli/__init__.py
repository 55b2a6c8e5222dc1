"""The command line: ``app`` (the Typer commands, in ``app.py``) and ``main`` (the ``compress``
console script); what they print is ``render.py``."""

from compress_cli.cli.app import app, main

__all__ = ["app", "main"]
