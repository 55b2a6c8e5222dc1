"""Channel pruning: remove output channels of convolutions and neurons of linear layers with
torch-pruning's dependency graph, so every dependent layer (batch norms, the next layers' inputs,
residual partners, concatenations, grouped convs, layer norms of a residual stream) follows and the
model really gets smaller; whole attention heads of ``nn.MultiheadAttention``-free transformer
blocks (timm ViT/DeiT ``Attention``, Hugging Face BERT-style self-attention, :func:`attention_heads`).

Every removal is proven exact before it is kept (:mod:`~compress_cli.pruning.exactness`): the
pruned model must compute what the model before it computes with the removed channels zeroed, or
the removal is refused, located, and the model left as it was. Holds the channel importance
criteria, the sync of channel counts and head counts that modules store as plain attributes, and
the up-front check for reshapes the dependency graph cannot follow at all
(:func:`high_rank_reshapes`). Channel removal changes constructor arguments of standard layers
(``Conv2d(64, 32)`` ...): the checkpoint's architecture diff records them, so a pruned model
reloads without pickles or per-stage code.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compress_cli._utils.batches import batch_size, call, to_device
from compress_cli._utils.modules import device_of, matches_any, output_layers
from compress_cli.errors import StageError
from compress_cli.pruning.common import Batches, check_forward, output_shapes
from compress_cli.pruning.exactness import (
    Exactness,
    Removal,
    compare,
    plan_of,
    restored_on_failure,
    zeroed_reference,
)
from compress_cli.pruning.unstructured import make_permanent

if TYPE_CHECKING:
    from compress_cli.tasks.base import Task

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


def high_rank_reshapes(model: nn.Module, example: Any) -> list[str]:
    """Reshapes in one forward pass that turn a tensor of at most 4 dimensions into one of 5 or
    more (ShuffleNet's channel shuffle, Swin's and MaxViT's window partitions), as
    ``"module: view [..] -> [..]"``. torch-pruning's dependency graph maps channels through
    flatten/unflatten between 2-D and 4-D only: on these it raises (ZeroDivisionError, TypeError)
    or grows its index mappings until memory runs out, so ``prune_channels`` refuses such a model
    up front. One entry per module. The head split inside an attention module that
    :func:`attention_heads` recognises (timm's ``qkv`` reshape) is not one: torch-pruning is told
    the head counts and removes whole heads."""
    from torch.overrides import TorchFunctionMode

    names = {id(m): n or type(model).__name__ for n, m in model.named_modules()}
    attention = set(attention_modules(model))
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
            if grows and func in reshapes and not (stack and stack[-1] in attention):
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
            call(model, example)
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
                call(model, to_device(x, dev))
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


def accumulate_gradients(model: nn.Module, batches: Batches, task: Task | None = None) -> None:
    """Sum the gradients of the calibration batches' loss into ``.grad`` (eval mode, so batch-norm
    statistics stay as they are): the task's loss (against the original model's outputs when it
    compares with them: label-free), or cross-entropy on the logits without a task."""
    import torch.nn.functional as F

    dev = device_of(model)
    was = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    try:
        with torch.enable_grad():
            for i, (x, y) in enumerate(batches):
                x = to_device(x, dev)
                y = to_device(y, dev) if y is not None else None
                if task is None:
                    if y is None:
                        raise StageError(
                            "importance 'taylor' without a task needs labelled calibration batches"
                        )
                    F.cross_entropy(call(model, x), y, reduction="sum").backward()
                    continue
                ref = task.reference_output(x, ("calibration", i)) if task.needs_reference else None
                (task.loss(task.forward(model, x), y, ref) * batch_size(x)).backward()
        for p in model.parameters():  # outside the loss (an output the task does not select): no effect
            if p.grad is None and p.requires_grad:
                p.grad = torch.zeros_like(p)
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
    "num_attention_heads",
    "head_dim",
    "attention_head_size",
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


# --------------------------------------------------------------------------- attention heads
def attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """The head count torch-pruning needs per attention projection: ``nn.MultiheadAttention``
    itself, the fused ``qkv`` Linear of timm ViT/DeiT-style attention (a module with ``qkv`` and
    ``num_heads``), and the ``query``/``key``/``value`` Linears of Hugging Face BERT-style
    self-attention (a module with those and ``num_attention_heads``)."""
    heads: dict[nn.Module, int] = {}
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            heads[m] = int(m.num_heads)
        elif (
            isinstance(qkv := getattr(m, "qkv", None), nn.Linear)
            and type(n := getattr(m, "num_heads", None)) is int
        ):
            heads[qkv] = n
        elif type(n := getattr(m, "num_attention_heads", None)) is int and all(
            isinstance(getattr(m, k, None), nn.Linear) for k in ("query", "key", "value")
        ):
            for k in ("query", "key", "value"):
                heads[getattr(m, k)] = n
    return heads


def attention_modules(model: nn.Module) -> list[str]:
    """Names of the attention modules :func:`attention_heads` recognises."""
    projections = set(attention_heads(model))
    return [
        n
        for n, m in model.named_modules()
        if m in projections
        or any(c in projections for c in m.children())
        and not isinstance(m, nn.Sequential)
    ]


def update_attention(model: nn.Module, heads: dict[nn.Module, int]) -> list[str]:
    """Store the head counts torch-pruning left in ``heads`` on the attention modules (``num_heads``,
    timm's ``attn_dim``, BERT's ``num_attention_heads`` and ``all_head_size``); whole heads were
    removed, so the head size stays. Returns the ``module.attribute`` names changed."""
    changed: list[str] = []

    def put(name: str, mod: nn.Module, attr: str, value: int) -> None:
        if getattr(mod, attr, None) != value:
            setattr(mod, attr, value)
            changed.append(f"{name}.{attr}" if name else attr)

    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention) and m in heads:
            put(name, m, "num_heads", heads[m])
            put(name, m, "head_dim", m.embed_dim // max(1, heads[m]))
        elif isinstance(getattr(m, "qkv", None), nn.Linear) and m.qkv in heads and hasattr(m, "num_heads"):
            put(name, m, "num_heads", heads[m.qkv])
            if type(getattr(m, "attn_dim", None)) is int and type(getattr(m, "head_dim", None)) is int:
                put(name, m, "attn_dim", heads[m.qkv] * m.head_dim)
        elif getattr(m, "query", None) in heads and hasattr(m, "num_attention_heads"):
            put(name, m, "num_attention_heads", heads[m.query])
            if hasattr(m, "all_head_size"):
                put(name, m, "all_head_size", int(m.query.out_features))
    return changed


# --------------------------------------------------------------------------- channel pruning
@dataclass
class ChannelPruneResult:
    """What :func:`prune_channels` did: conv/linear widths before and after, the layers whose width
    was kept, the pruning masks it made permanent first, per-step channel counts, the stored
    channel-count attributes it updated, the attention heads before and after, and the exactness
    check of every step (the worst one in ``exactness``)."""

    widths_before: dict[str, int]
    widths_after: dict[str, int]
    ignored: list[str]
    folded_masks: list[str]
    steps: list[dict[str, Any]] = field(default_factory=list)
    synced: list[str] = field(default_factory=list)  # stored channel counts updated
    heads: dict[str, list[int]] = field(default_factory=dict)  # attention module: [before, after]
    exactness: Exactness | None = None

    def width_table(self) -> dict[str, list[int]]:
        """``{layer: [width before, width after]}`` for every conv/linear layer (for the report)."""
        return {n: [b, self.widths_after.get(n, 0)] for n, b in self.widths_before.items()}

    @property
    def channels_removed(self) -> int:
        """Output channels/neurons removed over all conv/linear layers."""
        return sum(b - self.widths_after.get(n, 0) for n, b in self.widths_before.items())


def _head_table(model: nn.Module, heads: dict[nn.Module, int]) -> dict[str, int]:
    names = {m: n for n, m in model.named_modules()}
    return {names[m]: n for m, n in heads.items() if m in names}


def prune_channels(
    model: nn.Module,
    example: Any,
    *,
    importance: str = "l1",
    ratio: float = 0.5,
    scope: str = "layer",
    layer_ratios: dict[str, float] | None = None,
    max_ratio: float = 0.9,
    round_to: int | None = None,
    ignore: Sequence[str] = (),
    steps: int = 1,
    head_ratio: float = 0.0,
    calibration: Batches = (),
    task: Task | None = None,
    check_inputs: Any = None,
    between_steps: Callable[[int], None] | None = None,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
) -> ChannelPruneResult:
    """Remove ``ratio`` of the output channels/neurons of the model's convs and linears in place.

    ``scope="layer"`` removes the same share from every group of coupled layers; ``"global"`` ranks
    all channels together (normalised importance), no layer losing more than ``max_ratio``.
    ``layer_ratios`` maps module-name globs to their own ratio. The output layer and ``ignore``
    globs keep their output width. ``steps`` > 1 prunes gradually (linear schedule), calling
    ``between_steps(step)`` after each step but the last (fine-tuning) and re-scoring each time.
    Attention layers (:func:`attention_heads`) lose ``head_ratio`` of their heads, whole heads (a
    head's own dims are never cut: that would change the attention's scaling); 0 keeps them all.
    ``calibration`` (``(inputs, target)`` pairs) feeds the ``activation`` and ``taylor`` scores;
    ``taylor`` back-propagates ``task``'s loss (cross-entropy without a task).

    Every step is proven exact before it is kept: the pruned model's output on ``check_inputs``
    (default ``example``; a tensor, tuple or dict of keyword arguments) must equal that of the model
    before the step with the removed channels zeroed (:func:`~compress_cli.pruning.exactness.
    zeroed_reference`). Otherwise StageError names the first diverging layer and the model is left
    as it was before the call.
    """
    with restored_on_failure(model), bounded_group_search(model):
        return _prune_in_place(
            model,
            example,
            importance=importance,
            ratio=ratio,
            scope=scope,
            layer_ratios=layer_ratios or {},
            max_ratio=max_ratio,
            round_to=round_to,
            ignore=ignore,
            steps=steps,
            head_ratio=head_ratio,
            calibration=calibration,
            task=task,
            check_inputs=check_inputs,
            between_steps=between_steps,
            on_step=on_step,
        )


#: a group of coupled layers larger than this many entries per module of the model is a runaway
#: dependency search (see :func:`bounded_group_search`); real groups hold a few entries per module
GROUP_ENTRIES_PER_MODULE = 20
#: the most channel indices one index mapping through a flatten/reshape may produce (each index of a
#: 512-channel 7x7 map flattened for a Linear is 49 indices: 25 088; coatnet's chains reached 10^8)
INDEX_MAPPING_LIMIT = 1 << 21


@contextlib.contextmanager
def bounded_group_search(model: nn.Module) -> Iterator[None]:
    """Stop torch-pruning's dependency search with a StageError when one group of coupled layers
    grows past ``GROUP_ENTRIES_PER_MODULE`` entries per module of ``model``. Its search revisits a
    layer whenever it arrives with another index list, so on some architectures (timm's rexnet_100)
    it ran for more than 5 minutes in ``get_all_groups`` before anything was removed. Likewise an
    index list mapped through a flatten/reshape past ``INDEX_MAPPING_LIMIT`` indices (each channel
    index becomes one per spatial position, and chains of them multiply: timm's coatnet_nano_rw_224
    reached 13 GB that way) is refused before it is built."""
    from torch_pruning.dependency.group import Group
    from torch_pruning.dependency.index_mapping import _FlattenIndexMapping

    limit = GROUP_ENTRIES_PER_MODULE * max(1, sum(1 for _ in model.modules()))
    add_dep = Group.add_dep
    flatten = _FlattenIndexMapping.__call__

    def bounded_flatten(self: Any, idxs: Any) -> Any:
        n = len(idxs) * (1 if self.reverse else self._stride)
        if n > INDEX_MAPPING_LIMIT:
            raise StageError(
                f"torch-pruning's dependency search ran away on this model: mapping channels through a "
                f"flatten/reshape would make {n:,} channel indices (limit {INDEX_MAPPING_LIMIT:,}; each "
                "channel becomes one index per spatial position, and chained reshapes multiply them, "
                "taking gigabytes). Add the layers before that reshape to ignore: [module globs], or use "
                "prune (unstructured), drop_layers, codebook or quantize"
            )
        return flatten(self, idxs)

    def bounded(self: Any, dep: Any, idxs: Any) -> None:
        if len(self._group) >= limit:
            root = self._group[0].dep.target.name if self._group else "?"
            raise StageError(
                f"torch-pruning's dependency search ran away on this model: the group of layers "
                f"coupled to {root} grew past {limit} entries ({GROUP_ENTRIES_PER_MODULE} per module; "
                "it revisits layers through every path of index-remapping ops such as partial-channel "
                "residuals, taking minutes and gigabytes). Add the layers of that group to ignore: "
                "[module globs], or use prune (unstructured), drop_layers, codebook or quantize"
            )
        add_dep(self, dep, idxs)

    Group.add_dep = bounded  # type: ignore[method-assign]
    _FlattenIndexMapping.__call__ = bounded_flatten  # type: ignore[method-assign]
    try:
        yield
    finally:
        Group.add_dep = add_dep  # type: ignore[method-assign]
        _FlattenIndexMapping.__call__ = flatten  # type: ignore[method-assign]


def _prune_in_place(
    model: nn.Module,
    example: Any,
    *,
    importance: str,
    ratio: float,
    scope: str,
    layer_ratios: dict[str, float],
    max_ratio: float,
    round_to: int | None,
    ignore: Sequence[str],
    steps: int,
    head_ratio: float,
    calibration: Batches,
    check_inputs: Any,
    between_steps: Callable[[int], None] | None,
    on_step: Callable[[int, dict[str, Any]], None] | None,
    task: Task | None = None,
) -> ChannelPruneResult:
    """:func:`prune_channels` without the restore on failure."""
    import torch_pruning as tp

    folded = make_permanent(model)
    model.eval()
    dev = device_of(model)
    example = to_device(example, dev)
    check = example if check_inputs is None else to_device(check_inputs, dev)
    out_shape = output_shapes(model, example)
    layers = dict(prunable_layers(model))
    keep = set(output_layers(model, example))
    ignored = sorted(keep | {n for n in layers if matches_any(n, ignore)})
    ignored_mods = [layers[n] for n in ignored]
    ratio_dict: dict[Any, float] = {}
    for glob, r in layer_ratios.items():
        mods = tuple(m for n, m in layers.items() if fnmatch.fnmatchcase(n, glob) and n not in ignored)
        if not mods:
            raise StageError(f"layer_ratios: {glob!r} matches no prunable conv/linear layer")
        # a tuple key: ranked together under scope "global", one scope per layer under "layer"
        ratio_dict[mods] = r
    if importance == "taylor" and not calibration:
        raise StageError("importance 'taylor' needs calibration batches (it back-propagates the loss)")
    imp = make_importance(importance)
    before = layer_widths(model)
    dims_before = snapshot_widths(model)
    heads = attention_heads(model)
    heads_before = _head_table(model, heads)
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
            prune_num_heads=head_ratio > 0,
            prune_head_dims=False,
            head_pruning_ratio=head_ratio,
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
        res, synced = _one_step(model, pruner, importance, imp, calibration, step, check, dims_before, task)
        worst = result.exactness
        if worst is None or res.max_abs_diff / res.tolerance > worst.max_abs_diff / worst.tolerance:
            result.exactness = res
        result.synced += synced
        dims_before = snapshot_widths(model)
        check_forward(model, example, out_shape, f"after pruning step {step + 1}")
        widths = layer_widths(model)
        info = {"step": step + 1, "channels": sum(widths.values()), "exactness": res.as_dict()}
        result.steps.append(info)
        if on_step is not None:
            on_step(step + 1, info)
        if between_steps is not None and step + 1 < steps:
            between_steps(step + 1)
    result.widths_after = layer_widths(model)
    heads_after = _head_table(model, pruner.num_heads)
    result.heads = {n: [h, heads_after.get(n, h)] for n, h in heads_before.items()}
    if result.channels_removed == 0:
        hint = " (no group has a batch norm to score)" if importance == "bn_scale" else ""
        raise StageError(f"no channel could be removed{hint}; check ratio, ignore and layer_ratios")
    return result


def _one_step(
    model: nn.Module,
    pruner: Any,
    importance: str,
    imp: Any,
    calibration: Batches,
    step: int,
    check: Any,
    dims_before: dict[nn.Module, list[int]],
    task: Task | None = None,
) -> tuple[Exactness, list[str]]:
    """Score, choose and remove one step's channels, then prove the removal exact against the
    model before the step with the chosen channels zeroed (:func:`zeroed_reference`). Returns the
    check and the stored widths and head counts updated."""

    if importance == "activation":
        imp.collect(model, calibration)
    elif importance == "taylor":
        accumulate_gradients(model, calibration, task)
    from compress_cli.checkpoint import copy_model

    reference = copy_model(model)  # deepcopy that survives cached non-leaf tensors
    try:
        groups = list(pruner.step(interactive=True))
        plan = plan_of(model, groups, pruner.DG)
        for group in groups:
            group.prune()
    except Exception as e:
        raise StageError(f"channel removal failed at step {step + 1}: {_first_line(e)}") from None
    finally:
        if importance == "taylor":
            model.zero_grad(set_to_none=True)
    # stored widths and head counts first: the model reads them in forward (reshapes)
    synced = sync_width_attributes(model, dims_before) + update_attention(model, pruner.num_heads)
    try:
        with zeroed_reference(reference, plan) as zeroed:
            res = compare(zeroed, model, check)
    except Exception as e:
        raise StageError(
            f"channel removal at step {step + 1} could not be checked: the pruned model no longer runs "
            f"({_first_line(e)})"
        ) from None
    if not res.exact:
        roots = _roots_feeding(plan, res.first_divergence or "")
        fix = (
            f"keep the width of {', '.join(repr(r) for r in roots)} with ignore: [{', '.join(roots)}]"
            if roots
            else "keep the width of the layers feeding it with ignore"
        )
        raise StageError(
            f"channel removal is not exact at step {step + 1}: the pruned model differs from the model "
            f"with the removed channels zeroed by {res.max_abs_diff:.3g} (tolerance {res.tolerance:.3g}, "
            f"{res.samples} samples), first at layer '{res.first_divergence}'. torch-pruning's dependency "
            "graph did not follow the channels to it (a reshape or flatten after a permute, a custom op); "
            f"the model was left unchanged. {fix[0].upper()}{fix[1:]}, or use prune (unstructured), "
            "drop_layers or quantize on this model instead"
        )
    return res, synced


def _roots_feeding(plan: Sequence[Sequence[Removal]], layer: str) -> list[str]:
    """The producing layer of every group whose removed channels reach ``layer`` (or a module
    inside it): the layers whose width to keep so that ``layer`` is left alone."""
    roots = []
    for group in plan:
        if any(r.name == layer or r.name.startswith(layer + ".") for r in group):
            root = next((r.name for r in group if r.out and r.param_dim is None), None)
            if root is not None and root not in roots:
                roots.append(root)
    return roots


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
