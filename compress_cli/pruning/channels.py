"""Channel pruning: remove output channels of convolutions and neurons of linear layers with
torch-pruning's dependency graph, so every dependent layer (batch norms, the next layers' inputs,
residual partners, concatenations, grouped convs) follows and the model really gets smaller.

Holds the channel importance criteria, the sync of channel counts that non-standard modules store
as plain attributes, and the up-front check for models the dependency graph cannot follow
(:func:`high_rank_reshapes`). Channel removal changes constructor arguments of standard layers
(``Conv2d(64, 32)`` ...): the checkpoint's architecture diff records them, so a pruned model
reloads without pickles or per-stage code.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compress_cli._utils.modules import device_of, matches_any, output_layers
from compress_cli.errors import StageError
from compress_cli.pruning.common import Batches, check_forward
from compress_cli.pruning.unstructured import make_permanent

IMPORTANCES = ("l1", "l2", "activation", "taylor", "bn_scale")


# --------------------------------------------------------------------------- layers and widths
def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every convolution and linear layer: the layers whose width can change."""
    kinds = (nn.modules.conv._ConvNd, nn.Linear)
    return [(n, m) for n, m in model.named_modules() if n and isinstance(m, kinds)]


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width (out_channels / out_features) of every conv and linear layer."""
    return {
        n: int(getattr(m, "out_channels", getattr(m, "out_features", 0))) for n, m in prunable_layers(model)
    }


def high_rank_reshapes(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Reshapes in one forward pass that turn a tensor of at most 4 dimensions into one of 5 or
    more (ShuffleNet's channel shuffle, Swin's and MaxViT's window partitions), as
    ``"module: view [..] -> [..]"``. torch-pruning's dependency graph maps channels through
    flatten/unflatten between 2-D and 4-D only: on these it raises (ZeroDivisionError, TypeError)
    or grows its index mappings until memory runs out, so ``prune_channels`` refuses such a model
    up front. One entry per module."""
    from torch.overrides import TorchFunctionMode

    names = {id(m): n or type(model).__name__ for n, m in model.named_modules()}
    stack: list[str] = []
    found: dict[str, str] = {}
    reshapes = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.unflatten}

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            src: Any = args[0] if args else None
            grows = (
                isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and src.dim() <= 4 < out.dim()
            )
            if grows and func in reshapes:
                where = stack[-1] if stack else type(model).__name__
                found.setdefault(where, f"{where}: view {list(src.shape)} -> {list(out.shape)}")
            return out

    def enter(m: nn.Module, _i: Any) -> None:
        stack.append(names.get(id(m), "?"))

    def leave(_m: nn.Module, _i: Any, _o: Any) -> None:  # returns None: the output stays as it is
        stack.pop()

    pre = nn.modules.module.register_module_forward_pre_hook(enter)
    post = nn.modules.module.register_module_forward_hook(leave)
    was = model.training
    try:
        model.eval()
        with torch.no_grad(), Watch():
            model(example)
    finally:
        pre.remove()
        post.remove()
        model.train(was)
    return list(found.values())


# --------------------------------------------------------------------------- channel importance
class ActivationImportance:
    """The seed's I(i) = mean |z_i| over calibration batches, where z_i is channel/neuron i as the
    next layers receive it (after normalisation and activation). Per group: the mean over the
    consumers' input channels; normalised by the group mean so groups rank together globally."""

    def __init__(self) -> None:
        import torch_pruning as tp

        self._fn_in = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)
        self.scores: dict[nn.Module, torch.Tensor] = {}

    @torch.no_grad()
    def collect(self, model: nn.Module, batches: Batches) -> None:
        """Score every conv/linear input channel: mean |input| over ``batches`` (eval mode)."""
        sums: dict[nn.Module, torch.Tensor] = {}
        counts: dict[nn.Module, int] = {}

        def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: Any) -> None:
            x = inp[0].detach()
            if isinstance(mod, nn.Linear):
                x = x.reshape(-1, x.shape[-1])
                s, n = x.abs().sum(0), x.shape[0]
            else:
                s = x.abs().transpose(0, 1).reshape(x.shape[1], -1).sum(1)
                n = x.numel() // x.shape[1]
            sums[mod] = sums.get(mod, 0) + s.float()
            counts[mod] = counts.get(mod, 0) + n

        hooks = [m.register_forward_hook(hook) for _, m in prunable_layers(model)]
        dev = device_of(model)
        was = model.training
        model.eval()
        try:
            for x, _ in batches:
                model(x.to(dev))
        finally:
            model.train(was)
            for h in hooks:
                h.remove()
        self.scores = {m: sums[m] / max(1, counts[m]) for m in sums}

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        imps, idxs_all = [], []
        for i, (dep, idxs) in enumerate(group):
            layer, fn = dep.target.module, dep.handler
            if fn in self._fn_in and layer in self.scores:
                score = self.scores[layer]
                idx = torch.as_tensor(list(idxs), dtype=torch.long, device=score.device)
                if idx.numel() and int(idx.max()) < score.numel():
                    imps.append(score[idx])
                    idxs_all.append(group[i].root_idxs)
        if not imps:
            return None
        n_root = len(group[0][1])
        total = torch.zeros(n_root, device=imps[0].device)
        count = torch.zeros(n_root, device=imps[0].device)
        for imp, root in zip(imps, idxs_all, strict=True):
            if any(r is None for r in root):
                continue
            r = torch.as_tensor(list(root), dtype=torch.long, device=total.device)
            total.scatter_add_(0, r, imp.float())
            count.scatter_add_(0, r, torch.ones_like(imp, dtype=torch.float))
        if not bool((count > 0).all()):
            return None
        score = total / count  # mean |z| per root channel over its consumers (and spatial copies)
        return score / score.mean().clamp_min(1e-12)


def make_importance(kind: str) -> Any:
    """The torch-pruning importance object for criterion ``kind`` (one of :data:`IMPORTANCES`)."""
    import torch_pruning as tp

    if kind == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if kind == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if kind == "taylor":
        return tp.importance.GroupTaylorImportance()
    if kind == "bn_scale":
        return tp.importance.BNScaleImportance()
    if kind == "activation":
        return ActivationImportance()
    raise StageError(f"importance: unknown criterion {kind!r} (known: {', '.join(IMPORTANCES)})")


def accumulate_gradients(model: nn.Module, batches: Batches) -> None:
    """Sum the cross-entropy gradients of the calibration batches into ``.grad`` (eval mode, so
    batch-norm statistics stay as they are)."""
    import torch.nn.functional as F

    dev = device_of(model)
    was = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    try:
        with torch.enable_grad():
            for x, y in batches:
                F.cross_entropy(model(x.to(dev)), y.to(dev), reduction="sum").backward()
    finally:
        model.train(was)


# --------------------------------------------------------------------------- stored widths
_DIMS_OUT = ("out_channels", "out_features", "num_features", "num_channels", "embed_dim")
_DIMS_IN = ("in_channels", "in_features")
#: int attributes that are never a channel count
_NOT_WIDTHS = {
    "stride",
    "padding",
    "dilation",
    "groups",
    "kernel_size",
    "num_classes",
    "num_heads",
    "num_layers",
    "num_groups",
    "patch_size",
    "image_size",
    "seq_length",
    "output_padding",
}


def _dims(m: nn.Module) -> list[int]:
    """In/out widths of a standard layer (torch.nn class), else []."""
    if type(m).__module__.split(".")[0] != "torch":
        return []
    return [int(v) for a in _DIMS_OUT + _DIMS_IN if isinstance(v := getattr(m, a, None), int)]


def snapshot_widths(model: nn.Module) -> dict[nn.Module, list[int]]:
    """The in/out widths of every standard layer, for :func:`sync_width_attributes` afterwards."""
    return {m: _dims(m) for m in model.modules() if _dims(m)}


def sync_width_attributes(model: nn.Module, before: dict[nn.Module, list[int]]) -> list[str]:
    """Update channel counts that non-standard modules store as plain attributes (torchvision's
    ``Conv2dNormActivation.out_channels``, ViT's ``hidden_dim``, ...) after channels were removed.

    An int attribute is updated when its value was the width of standard layers inside the module
    and all those layers now agree on one new width; ambiguous ones are left alone. Returns the
    ``module.attribute`` names changed."""
    changed = []
    for name, mod in model.named_modules():
        if type(mod).__module__.split(".")[0] == "torch" and not isinstance(mod, nn.Sequential):
            continue  # standard layers: torch-pruning keeps their own attributes right
        pairs: list[tuple[int, int]] = []
        for sub in mod.modules():
            if sub in before:
                pairs += list(zip(before[sub], _dims(sub), strict=False))
        if not pairs:
            continue
        for attr, val in list(vars(mod).items()):
            if attr.startswith("_") or attr in _NOT_WIDTHS or type(val) is not int or val < 2:
                continue
            news = {new for old, new in pairs if old == val}
            if len(news) == 1 and (new := news.pop()) != val:
                setattr(mod, attr, new)
                changed.append(f"{name}.{attr}" if name else attr)
    return changed


# --------------------------------------------------------------------------- channel pruning
@dataclass
class ChannelPruneResult:
    """What :func:`prune_channels` did: conv/linear widths before and after, the layers whose width
    was kept, the pruning masks it made permanent first, per-step channel counts, and the stored
    channel-count attributes it updated."""

    widths_before: dict[str, int]
    widths_after: dict[str, int]
    ignored: list[str]
    folded_masks: list[str]
    steps: list[dict[str, Any]] = field(default_factory=list)
    synced: list[str] = field(default_factory=list)  # stored channel counts updated

    def width_table(self) -> dict[str, list[int]]:
        """``{layer: [width before, width after]}`` for every conv/linear layer (for the report)."""
        return {n: [b, self.widths_after.get(n, 0)] for n, b in self.widths_before.items()}

    @property
    def channels_removed(self) -> int:
        """Output channels/neurons removed over all conv/linear layers."""
        return sum(b - self.widths_after.get(n, 0) for n, b in self.widths_before.items())


def prune_channels(
    model: nn.Module,
    example: torch.Tensor,
    *,
    importance: str = "l1",
    ratio: float = 0.5,
    scope: str = "layer",
    layer_ratios: dict[str, float] | None = None,
    max_ratio: float = 0.9,
    round_to: int | None = None,
    ignore: Sequence[str] = (),
    steps: int = 1,
    calibration: Batches = (),
    between_steps: Callable[[int], None] | None = None,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
) -> ChannelPruneResult:
    """Remove ``ratio`` of the output channels/neurons of the model's convs and linears in place.

    ``scope="layer"`` removes the same share from every group of coupled layers; ``"global"`` ranks
    all channels together (normalised importance), no layer losing more than ``max_ratio``.
    ``layer_ratios`` maps module-name globs to their own ratio. The output layer and ``ignore``
    globs keep their output width. ``steps`` > 1 prunes gradually (linear schedule), calling
    ``between_steps(step)`` after each step but the last (fine-tuning) and re-scoring each time.
    """
    import torch_pruning as tp

    folded = make_permanent(model)
    model.eval()
    dev = device_of(model)
    example = example.to(dev)
    with torch.no_grad():
        out_shape = model(example).shape
    layers = dict(prunable_layers(model))
    keep = set(output_layers(model, example))
    ignored = sorted(keep | {n for n in layers if matches_any(n, ignore)})
    ignored_mods = [layers[n] for n in ignored]
    ratio_dict: dict[Any, float] = {}
    for glob, r in (layer_ratios or {}).items():
        mods = tuple(m for n, m in layers.items() if fnmatch.fnmatchcase(n, glob) and n not in ignored)
        if not mods:
            raise StageError(f"layer_ratios: {glob!r} matches no prunable conv/linear layer")
        # a tuple key: ranked together under scope "global", one scope per layer under "layer"
        ratio_dict[mods] = r
    if importance == "taylor" and not calibration:
        raise StageError("importance 'taylor' needs labelled calibration batches")
    imp = make_importance(importance)
    before = layer_widths(model)
    dims_before = snapshot_widths(model)
    # attention: remove the same dims from every head, so embed_dim stays a multiple of num_heads
    heads = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    try:
        pruner = tp.pruner.BasePruner(
            model,
            example,
            importance=imp,
            global_pruning=scope == "global",
            pruning_ratio=ratio,
            pruning_ratio_dict=ratio_dict or None,
            max_pruning_ratio=max_ratio,
            iterative_steps=steps,
            ignored_layers=ignored_mods,
            round_to=round_to,
            num_heads=heads,
        )
    except StageError:
        raise
    except Exception as e:
        raise StageError(
            f"torch-pruning could not trace the model: {_first_line(e)}; use prune (unstructured) or "
            "drop_layers on this model instead"
        ) from None
    result = ChannelPruneResult(before, before, ignored, folded)
    for step in range(steps):
        if importance == "activation":
            imp.collect(model, calibration)
        elif importance == "taylor":
            accumulate_gradients(model, calibration)
        try:
            pruner.step()
        except Exception as e:
            raise StageError(f"channel removal failed at step {step + 1}: {_first_line(e)}") from None
        finally:
            if importance == "taylor":
                model.zero_grad(set_to_none=True)
        result.synced += sync_width_attributes(model, dims_before)
        dims_before = snapshot_widths(model)
        check_forward(model, example, out_shape, f"after pruning step {step + 1}")
        widths = layer_widths(model)
        info = {"step": step + 1, "channels": sum(widths.values())}
        result.steps.append(info)
        if on_step is not None:
            on_step(step + 1, info)
        if between_steps is not None and step + 1 < steps:
            between_steps(step + 1)
    result.widths_after = layer_widths(model)
    if result.channels_removed == 0:
        hint = " (no group has a batch norm to score)" if importance == "bn_scale" else ""
        raise StageError(f"no channel could be removed{hint}; check ratio, ignore and layer_ratios")
    return result


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
