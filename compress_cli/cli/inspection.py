"""``compress inspect``: what is inside a checkpoint file or a compressed model directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress_cli.errors import SourceError


def inspect_path(path: Path) -> dict[str, Any]:
    """What ``compress inspect`` shows of a compressed model directory or a state-dict file: its kind,
    bytes on disk, float parameters and their sparsity (BN running stats left out), one row per tensor
    (shape, dtype, nonzeros, encoding). SourceError for a missing path or a pickled module."""
    from compress_cli.checkpoint import checkpoint_size, is_model_dir, load_parts, tensor_encodings
    from compress_cli.sources.models import read_state_dict

    if is_model_dir(path):
        manifest, sd = load_parts(path)
        kind, size, enc = (
            f"compressed model ({manifest['model']['source']})",
            checkpoint_size(path),
            tensor_encodings(path),
        )
    elif path.exists():
        obj = read_state_dict(path)
        if not isinstance(obj, dict):
            raise SourceError(f"{path}: holds a pickled module; inspect its state_dict instead")
        sd, kind, size, enc = obj, "state_dict", path.stat().st_size, {}
    else:
        raise SourceError(f"{path}: no such file or directory")
    rows = []
    total = nonzero = 0
    for name, t in sd.items():
        nz = int((t != 0).sum())
        if t.is_floating_point() and not name.endswith(("running_mean", "running_var")):
            total += t.numel()
            nonzero += nz
        rows.append(
            {
                "name": name,
                "shape": list(t.shape),
                "dtype": str(t.dtype).replace("torch.", ""),
                "nonzero": nz,
                "sparsity": 1 - nz / t.numel() if t.numel() else 0.0,
                "encoding": enc.get(name, ""),
            }
        )
    return {
        "kind": kind,
        "size_bytes": size,
        "params": total,
        "nonzero_params": nonzero,
        "sparsity": 1 - nonzero / total if total else 0.0,
        "tensors": rows,
    }
