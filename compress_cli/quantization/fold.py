"""Batch-norm folding: each conv -> BN pair becomes one conv (before int8 conversion, or codebooks).

The pairs are found by module pattern, not by tracing the model: one forward pass on an example
batch, watched by module hooks and a :class:`~torch.overrides.TorchFunctionMode`, records which
tensor each conv (or Linear) returned and which tensor each batch norm read. A BN folds into a conv
when it reads exactly that conv's output and nothing else reads it (no residual taps the pre-BN
value). So a ``forward`` with data-dependent control flow, which ``torch.fx`` cannot trace, folds as
well, and a model without batch norm is not run at all. The folded copy is checked against the
original on the same batch (fold nothing rather than fold wrong).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval
from torch.overrides import TorchFunctionMode

from compress_cli._utils.batches import call, float_tensors
from compress_cli._utils.modules import set_submodule
from compress_cli.errors import StageError

_CONV_FOR_DIMS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_DIMS = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}
#: relative L2 difference the folded model's outputs may have from the original's (float rounding)
FOLD_RTOL = 1e-4


def _tensors_in(obj: Any, found: list[torch.Tensor], depth: int = 0) -> None:
    if isinstance(obj, torch.Tensor):
        found.append(obj)
    elif depth < 3 and isinstance(obj, (tuple, list)):
        for o in obj:
            _tensors_in(o, found, depth + 1)
    elif depth < 3 and isinstance(obj, dict):
        for o in obj.values():
            _tensors_in(o, found, depth + 1)


class _Uses(TorchFunctionMode):
    """Counts, per watched tensor (by identity), the torch calls outside a batch norm's own forward
    that read it and compute a tensor (shape queries such as ``x.dim()`` are not uses): a conv
    output whose only reader is a BN has none."""

    def __init__(self) -> None:
        super().__init__()
        self.watched: dict[int, int] = {}  # id(tensor) -> uses
        self.inside_bn = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.inside_bn or not self.watched:
            return out
        produced: list[torch.Tensor] = []
        _tensors_in(out, produced)
        if not produced:
            return out
        read: list[torch.Tensor] = []
        _tensors_in(args, read)
        _tensors_in(kwargs, read)
        for t in {id(t) for t in read}:
            if t in self.watched:
                self.watched[t] += 1
        return out


def _foldable(conv: nn.Module, bn: nn.Module, bn_input: torch.Tensor) -> bool:
    if not (bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None):
        return False  # no running statistics: it normalizes with each batch's own
    dims = _DIMS[type(bn)]  # type: ignore[index]
    if type(conv) is _CONV_FOR_DIMS[dims]:
        return conv.out_channels == bn.num_features  # type: ignore[union-attr]
    # Linear -> BatchNorm1d over (N, C): the BN's channels are the Linear's outputs
    linear = type(conv) is nn.Linear and dims == 1 and bn_input.dim() == 2
    return linear and conv.out_features == bn.num_features


def conv_bn_pairs(model: nn.Module, example: Any) -> list[tuple[str, str]]:
    """(conv, batch norm) module pairs of ``model`` (in eval mode) where the BN reads exactly the
    conv's output and nothing else reads it, seen in one forward pass on ``example`` (a tensor,
    tuple or dict of inputs). Conv1d/2d/3d -> BatchNorm of the same rank, Linear -> BatchNorm1d on
    (N, C); each module must run once. No batch norm: no forward pass, no pairs."""
    mods = dict(model.named_modules())
    # exact types: a subclass may do more (timm's BatchNormAct2d applies its activation too)
    bns = {n for n, m in mods.items() if type(m) in _DIMS}
    if not bns:
        return []
    producers = {n for n, m in mods.items() if type(m) in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)}
    calls: dict[str, int] = {}
    made: dict[int, tuple[str, torch.Tensor]] = {}  # id(output) -> (conv, output: kept alive)
    reads: dict[str, torch.Tensor] = {}  # bn -> its input
    uses = _Uses()
    handles = []

    def pre(name: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        calls[name] = calls.get(name, 0) + 1
        if name in bns:
            if args and isinstance(args[0], torch.Tensor):
                reads[name] = args[0]
            uses.inside_bn += 1

    def post(name: str, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if name in bns:
            uses.inside_bn -= 1
        elif isinstance(out, torch.Tensor):
            made[id(out)] = (name, out)
            uses.watched[id(out)] = 0

    for name in bns | producers:
        m = mods[name]
        handles.append(m.register_forward_pre_hook(lambda mod, a, n=name: pre(n, mod, a)))
        handles.append(m.register_forward_hook(lambda mod, a, o, n=name: post(n, mod, a, o)))
    try:
        with torch.no_grad(), uses:
            call(model, example)
    finally:
        for h in handles:
            h.remove()
    pairs = []
    for bn_name in sorted(reads, key=list(mods).index):
        x = reads[bn_name]
        src = made.get(id(x))
        if src is None or src[1] is not x:
            continue
        conv_name = src[0]
        if calls.get(conv_name) != 1 or calls.get(bn_name) != 1 or uses.watched[id(x)] != 0:
            continue  # a shared module, or the pre-BN value is read elsewhere too
        if _foldable(mods[conv_name], mods[bn_name], x):
            pairs.append((conv_name, bn_name))
    return pairs


def _relative_difference(a: Any, b: Any) -> float:
    ta, tb = list(float_tensors(a)), list(float_tensors(b))
    if len(ta) != len(tb) or any(x.shape != y.shape for x, y in zip(ta, tb, strict=True)):
        return float("inf")
    worst = 0.0
    for x, y in zip(ta, tb, strict=True):
        x, y = x.double(), y.double()
        worst = max(worst, float((x - y).norm() / x.norm().clamp_min(1e-12)))
    return worst


def fold_batchnorm(
    model: nn.Module, example: Any = None, inplace: bool = False
) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` (eval mode, CPU) with each conv->BN pair folded (see
    :func:`conv_bn_pairs`): the conv gets the BN's affine map (and a bias), the BN becomes
    ``nn.Identity`` — standard layers, so the checkpoint's architecture diff records and rebuilds
    them without special code. ``example``: an input batch for the pass that finds the pairs (CPU;
    needed only when the model has batch norms). ``inplace``: fold ``model`` itself (a caller's own
    copy). The folded model's outputs on ``example`` are checked against the original's: a
    difference beyond float rounding undoes the folding (nothing folded). Returns (model,
    ["conv+bn", ...])."""
    model = (model if inplace else copy.deepcopy(model)).cpu().eval()
    if not any(type(m) in _DIMS for m in model.modules()):
        return model, []
    if example is None:
        raise StageError("batch-norm folding needs an example input batch (internal: none given)")
    pairs = conv_bn_pairs(model, example)
    if not pairs:
        return model, []
    with torch.no_grad():
        before = call(model, example)
        originals = []
        for conv_name, bn_name in pairs:
            conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
            fuse = fuse_linear_bn_eval if isinstance(conv, nn.Linear) else fuse_conv_bn_eval
            fused = fuse(conv, bn)  # type: ignore[type-var,arg-type]
            originals.append((conv_name, conv, bn_name, bn))
            set_submodule(model, conv_name, fused)
            set_submodule(model, bn_name, nn.Identity())
        if _relative_difference(before, call(model, example)) > FOLD_RTOL:
            for conv_name, conv, bn_name, bn in originals:  # a pair read elsewhere on a path not run
                set_submodule(model, conv_name, conv)
                set_submodule(model, bn_name, bn)
            return model, []
    return model, [f"{c}+{b}" for c, b in pairs]
