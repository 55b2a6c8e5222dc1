"""A ``package.module:callable`` model source for timm architectures (random init, no download).

``model.source: benchmarks.timm_models:make`` with ``model.kwargs: {name: resnet26d, num_classes: 10}``
builds ``timm.create_model(name, pretrained=False, **kwargs)``. The timm sweep
(``benchmarks/sweep_timm.py``) uses it until recipes name ``timm:NAME`` sources directly.
"""

from __future__ import annotations

from typing import Any


def make(name: str, **kwargs: Any) -> Any:
    """``timm.create_model(name, pretrained=False, **kwargs)``: never downloads weights."""
    import timm

    return timm.create_model(name, pretrained=False, **kwargs)
