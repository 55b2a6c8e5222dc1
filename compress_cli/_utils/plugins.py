"""Third-party plugins: the modules named by the entry-point group ``compress_cli.stages``.

Importing a plugin module registers what it defines: stages, quantization schemes, load transforms.
"""

from __future__ import annotations

from importlib.metadata import entry_points

GROUP = "compress_cli.stages"


def load_plugins() -> None:
    """Import every plugin module (again costs nothing: Python caches modules).

    Raises ImportError naming the entry point whose module fails to import, so callers can report
    one located line instead of the plugin's traceback."""
    for ep in entry_points(group=GROUP):
        try:
            ep.load()
        except Exception as e:
            raise ImportError(
                f"plugin entry point {ep.name} = {ep.value} failed to import ({type(e).__name__}: {e})"
            ) from e
