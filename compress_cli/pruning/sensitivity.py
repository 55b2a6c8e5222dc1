"""Per-layer sensitivity for unstructured pruning: scan each layer's accuracy drop at a few
sparsities, then allocate per-layer sparsities that reach an overall target with the least summed
damage (the ``prune`` stage's ``sensitivity`` option)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.utils.prune as tprune
from torch import nn

from compress_cli._utils.modules import tensor_attr
from compress_cli.pruning.unstructured import effective_weight, is_pruned, refresh


@dataclass
class SensitivityScan:
    """Per-layer damage curves: the accuracy drop (points) of each layer pruned alone at each ratio."""

    ratios: list[float]
    baseline_accuracy: float
    drops: dict[str, list[float]] = field(default_factory=dict)  # layer -> accuracy drop (points) per ratio
    numel: dict[str, int] = field(default_factory=dict)

    def table(self) -> list[dict[str, Any]]:
        """One row per layer: its name, weight count and the drop at each ratio (for the report)."""
        return [
            {
                "layer": n,
                "params": self.numel[n],
                **{f"{r:g}": round(d, 3) for r, d in zip(self.ratios, ds, strict=True)},
            }
            for n, ds in self.drops.items()
        ]


def scan_sensitivity(
    targets: list[tuple[str, nn.Module]],
    ratios: Sequence[float],
    accuracy: Callable[[], float],
    on_step: Callable[[], None] | None = None,
) -> SensitivityScan:
    """Prune one layer at a time to each ratio (L1, counting zeros already there), measure the
    accuracy drop in points, restore the layer. The model is left as it was.

    ``accuracy()`` returns the top-1 accuracy (a fraction) of the model holding ``targets`` on a
    fixed validation set; the caller chooses the batches and the runtime, so this algorithm needs
    no data or runner of its own. ``on_step`` is called after each measurement (progress)."""
    base = accuracy()
    scan = SensitivityScan(ratios=list(ratios), baseline_accuracy=base)
    for name, mod in targets:
        src = tensor_attr(mod, "weight_orig" if is_pruned(mod) else "weight")
        saved = src.detach().clone()
        w = effective_weight(mod)
        drops = []
        for r in ratios:
            k = int(round(r * w.numel()))
            keep = (
                tprune.L1Unstructured(amount=k).compute_mask(w.abs(), torch.ones_like(w))
                if k > 0
                else torch.ones_like(w)
            )
            with torch.no_grad():
                src.copy_(w * keep)
            refresh(mod)
            drops.append((base - accuracy()) * 100)
            if on_step is not None:
                on_step()
        with torch.no_grad():
            src.copy_(saved)
        refresh(mod)
        scan.drops[name] = drops
        scan.numel[name] = w.numel()
    return scan


def _hull(ratios: Sequence[float], drops: Sequence[float]) -> list[tuple[float, float]]:
    """Lower convex hull of the damage curve through (0, 0) and the scanned points, after making
    it non-decreasing (a drop that shrinks at a higher ratio is noise)."""
    pts, top = [(0.0, 0.0)], 0.0
    for r, d in zip(ratios, drops, strict=True):
        top = max(top, d)
        pts.append((r, top))
    hull: list[tuple[float, float]] = []
    for p in pts:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):  # hull[-1] is not below the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate(
    scan: SensitivityScan, target: float, floors: dict[str, float] | None = None
) -> dict[str, float]:
    """Per-layer sparsities whose weighted mean is ``target`` with the least summed damage.

    Each layer's measured damage curve (accuracy drop vs sparsity) is made non-decreasing and
    replaced by its lower convex hull; pieces of sparsity are then handed out greedily by damage
    per pruned weight, cheapest first, across all layers (optimal for convex piecewise-linear
    curves: every layer ends at the same marginal damage per weight). A layer starts at its
    ``floors`` value (the sparsity it already has). Raises ValueError when even the largest
    scanned ratio everywhere falls short of the target."""
    names = list(scan.drops)
    floors = floors or {}
    total = sum(scan.numel[k] for k in names)
    alloc = {k: floors.get(k, 0.0) for k in names}
    need = target * total - sum(alloc[k] * scan.numel[k] for k in names)
    pieces = []  # (damage per weight, layer order, layer, from, to)
    for order, k in enumerate(names):
        hull = _hull(scan.ratios, scan.drops[k])
        for (x1, y1), (x2, y2) in zip(hull, hull[1:], strict=False):
            lo = max(x1, alloc[k])
            if x2 > lo:
                pieces.append(((y2 - y1) / ((x2 - x1) * scan.numel[k]), order, k, lo, x2))
    reach = sum((b - a) * scan.numel[k] for _, _, k, a, b in pieces)
    if reach < need - 1e-9:
        best = (total * target - need + reach) / total
        raise ValueError(
            f"the scanned ratios reach at most {best:.3f} overall sparsity (target {target}); "
            "add larger sensitivity.ratios"
        )
    for _, _, k, a, b in sorted(pieces):
        if need <= 1e-9:
            break
        take = min(b - a, need / scan.numel[k])
        alloc[k] = a + take
        need -= take * scan.numel[k]
    return alloc
