"""Deep Compression's trained quantization (Han et al. 2016, section 3): per-layer weight sharing.

The nonzero weights of a layer are clustered with 1-D k-means into ``2**bits`` centroids (linear
initialisation over [min, max], which the paper found best because it keeps the rare large
weights); each weight is replaced by its centroid, zeros stay zero, so pruning and sharing
compose. The checkpoint then stores the layer as bitmask + ``bits``-bit indices + the centroid
table (the palette encoding of checkpoint/codec.py).

Centroid fine-tuning: instead of re-snapping weights after each optimizer step, the weight of a
shared layer is parametrized (``torch.nn.utils.parametrize``) as ``where(mask, centroids[index],
0)`` with ``centroids`` the only trainable tensor. Its backward gives each centroid exactly the sum of
the gradients of the weights sharing it (the paper's update rule), the optimizer keeps its
momentum/Adam state per centroid, and the weights can never leave the codebook. Removing the
parametrization at the end bakes the shared values into a plain ``weight``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn

from compress_cli._utils.modules import tensor_attr


def kmeans_1d(values: torch.Tensor, k: int, iters: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on a 1-D tensor with centroids initialised linearly over [min, max].

    Returns (sorted centroids, labels); deterministic. A cluster left empty (after pruning the
    linear grid has centroids inside the gap around zero) is re-seeded at the value farthest from
    its centroid, so all ``k`` codes get used when there are at least ``k`` distinct values.
    Works in float64 on the sorted values with prefix sums (each round costs O(k log n)); stops
    when the clusters no longer change, or after ``iters`` rounds.
    """
    v = values.detach().reshape(-1).double()
    vs = torch.sort(v).values
    n = vs.numel()
    prefix = torch.cat([vs.new_zeros(1), torch.cumsum(vs, 0)])
    distinct = int(torch.unique_consecutive(vs).numel())
    c = torch.linspace(float(vs[0]), float(vs[-1]), k, dtype=torch.float64, device=v.device)
    edges = None
    for _ in range(iters):
        c = torch.sort(c).values
        ends = torch.cat(
            [torch.searchsorted(vs, (c[1:] + c[:-1]) / 2, right=True), vs.new_tensor([n], dtype=torch.long)]
        )
        starts = torch.cat([ends.new_zeros(1), ends[:-1]])
        counts = ends - starts
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty and k - len(empty) < distinct:
            full = (counts > 0).nonzero().flatten()
            lo_err = (vs[starts[full]] - c[full]).abs()
            hi_err = (vs[ends[full] - 1] - c[full]).abs()
            cand_err = torch.cat([lo_err, hi_err])
            cand_val = torch.cat([vs[starts[full]], vs[ends[full] - 1]])
            order = torch.argsort(cand_err, descending=True, stable=True).tolist()
            for j, i in zip(empty, order, strict=False):
                c[j] = cand_val[i]  # re-seed; the next round reassigns
            continue
        if edges is not None and torch.equal(ends, edges):
            break
        edges = ends
        sums = prefix[ends] - prefix[starts]
        c = torch.where(counts > 0, sums / counts.clamp_min(1), c)
    c = torch.sort(c).values
    return c, torch.bucketize(v, (c[1:] + c[:-1]) / 2)


class _Lookup(torch.autograd.Function):
    """``centroids[index]`` whose backward sums the gradients per centroid with ``bincount``
    (deterministic, in float64) instead of indexing's scatter-add, which is not deterministic
    on CPU for large layers."""

    @staticmethod
    def forward(ctx: Any, centroids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.k = centroids.numel()
        return centroids[index]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (index,) = ctx.saved_tensors
        g = torch.bincount(index.reshape(-1), weights=grad.reshape(-1).double(), minlength=ctx.k)
        return g.to(grad.dtype), None


class SharedWeight(nn.Module):
    """Parametrization ``weight = where(mask, centroids[index], 0)``; only ``centroids`` trains."""

    index: torch.Tensor
    mask: torch.Tensor

    def __init__(self, centroids: torch.Tensor, index: torch.Tensor, mask: torch.Tensor):
        super().__init__()
        self.centroids = nn.Parameter(centroids.clone())
        self.register_buffer("index", index)
        self.register_buffer("mask", mask)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        """``centroids[index]`` where ``mask`` is set, else 0; the stored ``original`` is not read."""
        w = _Lookup.apply(self.centroids, self.index)
        return torch.where(self.mask, w, torch.zeros((), dtype=w.dtype, device=w.device))


@dataclass
class Shared:
    """The outcome for one layer."""

    bits: int
    clusters: int  # centroids in use
    nonzero: int
    mse: float  # mean squared change of the nonzero weights


def share_weights(module: nn.Module, bits: int, iters: int = 100) -> Shared:
    """Replace ``module.weight`` by its k-means codebook values (in place, zeros kept)."""
    w = tensor_attr(module).detach()
    mask = w != 0
    nz = w[mask]
    k = 2**bits
    if nz.numel() == 0:
        return Shared(bits, 0, 0, 0.0)
    c, labels = kmeans_1d(nz, k, iters)
    c32 = c.to(w.dtype)
    new = torch.zeros_like(w)
    new[mask] = c32[labels]
    mse = float(((new[mask] - nz) ** 2).mean())
    with torch.no_grad():
        tensor_attr(module).copy_(new)
    return Shared(bits, int(torch.unique(new[mask]).numel()), int(nz.numel()), mse)


def attach(module: nn.Module) -> None:
    """Parametrize ``module.weight`` (already shared) for centroid fine-tuning."""
    w = tensor_attr(module).detach()
    mask = w != 0
    values, inverse = torch.unique(w[mask], return_inverse=True)
    index = torch.zeros(w.shape, dtype=torch.long, device=w.device)
    index[mask] = inverse
    if values.numel() == 0:
        values = w.new_zeros(1)
    tensor_attr(module).requires_grad_(False)
    parametrize.register_parametrization(module, "weight", SharedWeight(values, index, mask))


def detach(module: nn.Module) -> None:
    """Bake the fine-tuned codebook values into a plain ``weight`` parameter."""
    if parametrize.is_parametrized(module, "weight"):
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        tensor_attr(module).requires_grad_(True)


def distinct_nonzero(module: nn.Module) -> int:
    """How many distinct nonzero values ``module.weight`` holds (the centroids a shared layer uses)."""
    w = tensor_attr(module).detach()
    return int(torch.unique(w[w != 0]).numel())


def round_others(model: nn.Module, skip: set[int], dtype: torch.dtype) -> list[str]:
    """Round every floating parameter and buffer not in ``skip`` (ids) to ``dtype``'s values in
    place (the model stays float32; the checkpoint stores them in 2 bytes). A tensor that would
    overflow, or lose a nonzero to zero, is left as it is. Returns the names rounded."""
    done = []
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, t in tensors:
        if id(t) in skip or not t.is_floating_point() or t.dtype == dtype:
            continue
        r = t.detach().to(dtype).to(t.dtype)
        if not torch.equal(torch.isfinite(r), torch.isfinite(t)) or bool(((r == 0) & (t != 0)).any()):
            continue
        with torch.no_grad():
            t.copy_(r)
        done.append(name)
    return done


def absorb_batchnorm_stats(model: nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    """Rewrite every affine batch norm with running statistics so that its statistics live in its
    weight and bias: ``weight' = weight / sqrt(var + eps)``, ``bias' = bias - mean * weight'``, running
    mean 0 and running variance ``1 - eps`` (so ``var + eps`` is 1). Eval-mode outputs are unchanged
    (to float rounding); the two statistics become constants that the checkpoint stores in a few
    bytes. For a model that no longer trains (training mode would update the statistics again).
    Returns the names rewritten and the constant tensors (to leave out of any later rounding)."""
    done: list[str] = []
    constants: list[torch.Tensor] = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm) or not m.affine:
            continue
        if m.running_mean is None or m.running_var is None:
            continue
        with torch.no_grad():
            inv = (m.running_var.double() + m.eps).rsqrt()
            scale = m.weight.double() * inv
            m.bias.copy_(m.bias.double() - m.running_mean.double() * scale)
            m.weight.copy_(scale)
            m.running_mean.zero_()
            m.running_var.fill_(1.0 - m.eps)
        constants += [m.running_mean, m.running_var]
        done.append(name)
    return done, constants
