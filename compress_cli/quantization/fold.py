"""Batch-norm folding: each conv -> BN pair becomes one conv (before int8 conversion, or codebooks)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from compress_cli._utils.quiet import quiet
from compress_cli.errors import StageError

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV_FOR_DIMS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_DIMS = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, batch norm) module pairs where the BN reads only that conv's output (torch.fx trace)."""
    mods = dict(model.named_modules())
    if not any(isinstance(m, _BATCHNORMS) for m in mods.values()):
        return []
    try:
        with quiet():
            gm = torch.fx.symbolic_trace(model)
    except Exception as e:
        raise StageError(
            f"cannot fold batch norm into convolutions: torch.fx cannot trace the model ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), _BATCHNORMS):
            continue
        src: Any = node.args[0] if node.args else None
        if getattr(src, "op", None) != "call_module" or len(src.users) != 1:
            continue
        conv, bn = mods.get(src.target), mods[node.target]
        dims = _DIMS[type(bn)]  # type: ignore[index]
        if type(conv) is not _CONV_FOR_DIMS[dims] or calls[src.target] != 1 or calls[node.target] != 1:
            continue
        if bn.track_running_stats and bn.running_mean is not None:
            pairs.append((src.target, node.target))
    return pairs


def fold_batchnorm(model: nn.Module, inplace: bool = False) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` (eval mode, CPU) with each conv->BN pair folded: the conv gets the BN's
    affine map (and a bias), the BN becomes ``nn.Identity`` — standard layers, so the checkpoint's
    architecture diff records and rebuilds them without special code. ``inplace``: fold ``model``
    itself (a caller's own copy), not a copy of it. Returns (model, ["conv+bn", ...])."""
    model = (model if inplace else copy.deepcopy(model)).cpu().eval()
    folded = []
    with torch.no_grad():
        for conv_name, bn_name in conv_bn_pairs(model):
            conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
            fused = fuse_conv_bn_eval(conv, bn)  # type: ignore[type-var,arg-type]
            _set_submodule(model, conv_name, fused)
            _set_submodule(model, bn_name, nn.Identity())
            folded.append(f"{conv_name}+{bn_name}")
    return model, folded
