"""Arrays as JSON, exactly: how manifests store quantization scales and zero points."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


def pack_array(a: Any) -> dict[str, Any]:
    """A numpy array / tensor as JSON: dtype, shape and the raw bytes in base64 (exact)."""
    import numpy as np
    import torch

    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.array(a, order="C")  # not ascontiguousarray: it turns a 0-d scale into shape [1]
    return {
        "dtype": str(a.dtype),
        "shape": list(a.shape),
        "b64": base64.b64encode(a.tobytes()).decode("ascii"),
    }


def unpack_array(d: dict[str, Any]) -> np.ndarray:
    """The array :func:`pack_array` stored (a writable copy, same dtype and shape)."""
    import numpy as np

    raw = base64.b64decode(d["b64"])
    return np.frombuffer(raw, dtype=np.dtype(d["dtype"])).reshape(d["shape"]).copy()
