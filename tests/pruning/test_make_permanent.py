"""``pruning.make_permanent``: the one way to turn torch.nn.utils.prune masks into plain weights."""

from __future__ import annotations

import copy

import torch
import torch.nn.utils.prune as tprune
from torch import nn

from compress_cli import pruning as P
from compress_cli.testing import tiny_cnn, tiny_mlp

X = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def pruned_mlp() -> nn.Module:
    """digits_mlp pruned twice (masks composed by a PruningContainer), with the detach hook fired
    by a training forward, as a model looks after two prune stages and a finetune."""
    model = tiny_mlp()
    mods = [model.fc1, model.fc2]
    P.prune_global(mods, 0.5)
    P.prune_layer(model.fc1, 0.7)
    model.train()
    model(X).sum().backward()
    return model.eval()


def prune_hooks(model: nn.Module) -> list[str]:
    return [
        f"{n}:{type(h).__name__}"
        for n, m in model.named_modules()
        for h in m._forward_pre_hooks.values()
        if isinstance(h, tprune.BasePruningMethod)
    ]


def test_hooks_and_reparametrizations_are_gone_and_weights_equal():
    model = pruned_mlp()
    assert prune_hooks(model) and any(m._forward_hooks for m in model.modules())  # the detach hooks
    effective = {n: P.effective_weight(m).clone() for n, m in model.named_modules() if P.is_pruned(m)}
    y = model(X)

    assert P.make_permanent(model) == ["fc1.weight", "fc2.weight"]
    assert prune_hooks(model) == []
    assert all(not m._forward_hooks for m in model.modules())
    assert not any(k.endswith(("_orig", "_mask")) for k in model.state_dict())
    for name, w in effective.items():
        weight = model.get_submodule(name).weight
        assert isinstance(weight, nn.Parameter) and weight.grad_fn is None
        assert torch.equal(weight.detach(), w)
    assert torch.equal(model(X), y)
    copy.deepcopy(model)
    assert P.make_permanent(model) == []  # a no-op once done


def test_only_named_modules_are_made_permanent():
    model = pruned_mlp()
    assert P.make_permanent(model, only=["fc2"]) == ["fc2.weight"]
    assert P.is_pruned(model.fc1) and not P.is_pruned(model.fc2)
    assert not model.fc2._forward_hooks and model.fc1._forward_hooks


def test_channel_and_layer_removal_leave_no_pruning_hook_behind():
    cnn = tiny_cnn().eval()
    P.prune_layer(cnn.conv2, 0.5)  # as the prune stage leaves it: mask + detach hook
    assert prune_hooks(cnn) and cnn.conv2._forward_hooks
    res = P.prune_channels(cnn, X[:1], ratio=0.25)
    assert res.folded_masks == ["conv2.weight"]
    assert prune_hooks(cnn) == [] and all(not m._forward_hooks for m in cnn.modules())
