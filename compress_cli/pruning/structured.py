"""Structured pruning: remove output channels / neurons (with torch-pruning's dependency graph) and
whole layers or residual blocks. Plain functions; the ``prune_channels`` and ``drop_layers`` stages
are thin wrappers around them.

Channel removal changes constructor arguments of standard layers (``Conv2d(64, 32)`` ...), and
layer removal swaps modules for ``nn.Identity`` or a block's shortcut path: ``checkpoint.py``'s
architecture diff records both, so a pruned model reloads without pickles or per-stage code.
"""

from __future__ import annotations

import fnmatch
import math
import operator
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compress_cli.errors import StageError

Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]

IMPORTANCES = ("l1", "l2", "activation", "taylor", "bn_scale")
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
_ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.LeakyReLU,
    nn.Sigmoid,
    nn.Tanh,
)


# --------------------------------------------------------------------------- helpers
def make_pruning_permanent(model: nn.Module) -> list[str]:
    """Fold torch.nn.utils.prune reparametrisations (``weight_orig * weight_mask``) into plain
    parameters, so graph surgery sees ordinary layers. Returns ``module.tensor`` names folded."""
    from torch.nn.utils import prune

    folded = []
    for name, mod in model.named_modules():
        names = [
            h._tensor_name
            for h in list(mod._forward_pre_hooks.values())
            if isinstance(h, prune.BasePruningMethod)
        ]
        for t in names:
            prune.remove(mod, t)
            folded.append(f"{name}.{t}" if name else t)
    return folded


def matches_any(name: str, globs: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    kinds = (nn.modules.conv._ConvNd, nn.Linear)
    return [(n, m) for n, m in model.named_modules() if n and isinstance(m, kinds)]


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width (out_channels / out_features) of every conv and linear layer."""
    return {
        n: int(getattr(m, "out_channels", getattr(m, "out_features", 0))) for n, m in prunable_layers(model)
    }


def executed_order(
    model: nn.Module, example: torch.Tensor, kinds: tuple[type, ...] = (nn.modules.conv._ConvNd, nn.Linear)
) -> list[str]:
    """Names of ``kinds`` modules in the order one forward pass calls them."""
    order: list[str] = []
    hooks = []
    for name, mod in model.named_modules():
        if name and isinstance(mod, kinds):
            hooks.append(
                model.get_submodule(name).register_forward_hook(lambda m, i, o, n=name: order.append(n))
            )
    try:
        was = model.training
        model.eval()
        with torch.no_grad():
            model(example)
        model.train(was)
    finally:
        for h in hooks:
            h.remove()
    return order


def output_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """The layer producing the model's outputs (the last conv/linear a forward pass runs)."""
    order = executed_order(model, example)
    return order[-1:]


def check_forward(model: nn.Module, example: torch.Tensor, out_shape: torch.Size | None, what: str) -> None:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            y = model(example)
    except Exception as e:
        raise StageError(
            f"{what}: the model no longer runs ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    finally:
        model.train(was)
    if not isinstance(y, torch.Tensor) or (out_shape is not None and y.shape != out_shape):
        raise StageError(
            f"{what}: output shape changed to {getattr(y, 'shape', type(y))} (expected {tuple(out_shape or ())})"
        )
    if not torch.isfinite(y).all():
        raise StageError(f"{what}: the model's outputs are no longer finite")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


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
def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


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
        dev = _device_of(model)
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

    dev = _device_of(model)
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
    widths_before: dict[str, int]
    widths_after: dict[str, int]
    ignored: list[str]
    folded_masks: list[str]
    steps: list[dict[str, Any]] = field(default_factory=list)
    synced: list[str] = field(default_factory=list)  # stored channel counts updated

    def width_table(self) -> dict[str, list[int]]:
        return {n: [b, self.widths_after.get(n, 0)] for n, b in self.widths_before.items()}

    @property
    def channels_removed(self) -> int:
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

    folded = make_pruning_permanent(model)
    model.eval()
    dev = _device_of(model)
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


# --------------------------------------------------------------------------- layer removal
@dataclass
class Candidate:
    """A module that can be removed: replaced by ``make()`` (identity or its shortcut path)."""

    name: str
    kind: str  # "residual" | "layer"
    replacement: str  # "identity" | "shortcut:<child>"
    post: list[nn.Module] = field(default_factory=list)  # ops after the residual add (e.g. ReLU)
    score: float | None = None
    params: int = 0
    bypass: nn.Module | None = field(default=None, repr=False)  # the replacement, once built

    def replacement_module(self) -> nn.Module:
        if self.bypass is None:
            raise StageError(f"{self.name}: no replacement built (call build_bypasses first)")
        return self.bypass

    def make(self, model: nn.Module, drop_post: bool = False) -> nn.Module:
        mod = model.get_submodule(self.name)
        post = [] if drop_post else [_fresh(p) for p in self.post]
        if self.replacement == "identity":
            if not post:
                return nn.Identity()
            return nn.Sequential(OrderedDict((f"post{i}", p) for i, p in enumerate(post)))
        short = mod.get_submodule(self.replacement.partition(":")[2])
        # a Sequential subclass that only chains its children (torchvision's Conv2dNormActivation)
        # becomes a plain Sequential of the same children, which the checkpoint can describe
        chain = isinstance(short, nn.Sequential) and type(short).forward is nn.Sequential.forward
        if not post and (type(short) is nn.Sequential or not chain):
            return short
        items = list(short.named_children()) if chain else [("shortcut", short)]
        items += [(f"post{i}", p) for i, p in enumerate(post)]
        return nn.Sequential(OrderedDict(items))


def _fresh(m: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(m)


def _is_add(node: Any) -> bool:
    if node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add):
        return True
    return node.op == "call_method" and node.target in ("add", "add_")


def residual_structure(block: nn.Module) -> tuple[str, list[nn.Module]] | None:
    """``(replacement, post_ops)`` when ``block``'s forward ends in ``post(main(x) + shortcut(x))``
    with shortcut the identity or one child module, else None. Found by tracing with torch.fx."""
    import torch.fx as fx
    import torch.nn.functional as F

    try:
        gm = fx.symbolic_trace(block)
    except Exception:
        return None
    nodes = list(gm.graph.nodes)
    ph = [n for n in nodes if n.op == "placeholder"]
    outs = [n for n in nodes if n.op == "output"]
    if len(ph) != 1 or len(outs) != 1:
        return None
    x = ph[0]
    # walk back from the output through single-input activations to the final add
    post: list[nn.Module] = []
    n = outs[0].args[0]
    while not (hasattr(n, "op") and _is_add(n)):
        if not hasattr(n, "op"):
            return None
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), _ACTIVATIONS):
            post.insert(0, gm.get_submodule(n.target))
        elif n.op == "call_function" and n.target in (F.relu, torch.relu):
            post.insert(0, nn.ReLU())
        else:
            return None
        if len(n.args) != 1 or len(n.all_input_nodes) != 1:
            return None
        n = n.args[0]
    add = n
    if len(add.all_input_nodes) != 2 or any(len(a.users) != 1 and a is not x for a in add.all_input_nodes):
        return None
    for skip in add.all_input_nodes:
        if skip is x:
            return "identity", post
        chain, cur = [], skip
        while hasattr(cur, "op") and cur.op == "call_module" and len(cur.args) == 1:
            chain.append(cur.target)
            cur = cur.args[0]
            if cur is x:
                break
        if cur is x and chain:
            heads = {t.split(".")[0] for t in chain}
            if len(heads) == 1:
                head = heads.pop()
                child = block.get_submodule(head)
                leaves = [nm for nm, m in child.named_modules() if not list(m.children())]
                called = {t.split(".", 1)[1] if "." in t else "" for t in chain}
                if set(leaves) <= called or (not list(child.children()) and "" in called):
                    return f"shortcut:{head}", post
    return None


def find_candidates(model: nn.Module, example: torch.Tensor, protect: Sequence[str] = ()) -> list[Candidate]:
    """Residual blocks (replaceable by identity or their shortcut) and shape-preserving layers with
    parameters inside ``nn.Sequential`` stacks; never the output layer or ``protect`` globs."""
    out_layer = set(output_layers(model, example))
    shapes: dict[str, tuple[Any, Any]] = {}
    hooks = []
    names = dict((m, n) for n, m in model.named_modules())

    def hook(mod: nn.Module, inp: tuple[Any, ...], out: Any) -> None:
        if inp and isinstance(inp[0], torch.Tensor) and isinstance(out, torch.Tensor):
            shapes.setdefault(names[mod], (tuple(inp[0].shape), tuple(out.shape)))

    for name, mod in model.named_modules():
        if name:
            hooks.append(mod.register_forward_hook(hook))
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    all_names = [n for n, _ in model.named_modules()]
    seq_children = {
        f"{pn}.{cn}" if pn else cn
        for pn, pm in model.named_modules()
        if isinstance(pm, nn.Sequential)
        for cn, _ in pm.named_children()
    }
    cands: list[Candidate] = []
    for name, mod in model.named_modules():
        if not name or name not in shapes or not any(True for _ in mod.parameters()):
            continue
        inside = [n for n in all_names if n == name or n.startswith(name + ".")]
        if any(n in out_layer for n in inside) or any(matches_any(n, protect) for n in inside):
            continue
        n_params = sum(p.numel() for p in mod.parameters())
        same = shapes[name][0] == shapes[name][1]
        plain_seq = isinstance(mod, nn.Sequential) and type(mod).forward is nn.Sequential.forward
        res = residual_structure(mod) if list(mod.children()) and not plain_seq else None
        if res is not None and (res[0] != "identity" or same):
            cands.append(Candidate(name, "residual", res[0], res[1], params=n_params))
        elif name in seq_children and same and not isinstance(mod, _NORMS):
            cands.append(Candidate(name, "layer", "identity", params=n_params))
    return _dedupe(cands)


def _dedupe(cands: list[Candidate]) -> list[Candidate]:
    """One candidate per unit: drop an outer candidate that holds no parameters beyond one inner
    candidate (the same removal), a layer (e.g. a whole stage) that holds residual blocks (the
    blocks are the units), and a layer nested inside another layer (conv-BN-act: keep the unit)."""

    def inside(a: Candidate, b: Candidate) -> bool:
        return a.name.startswith(b.name + ".")

    out = [c for c in cands if not any(inside(d, c) and d.params == c.params for d in cands)]
    out = [
        c for c in out if not (c.kind == "layer" and any(d.kind == "residual" and inside(d, c) for d in out))
    ]
    return [
        c for c in out if not (c.kind == "layer" and any(d.kind == "layer" and inside(c, d) for d in out))
    ]


def build_bypasses(model: nn.Module, cands: list[Candidate], calib: Batches) -> None:
    """Set each candidate's ``bypass`` module. Post-ops that leave every observed bypass value
    unchanged (a ReLU after an identity shortcut on non-negative inputs) are left out."""
    need = {model.get_submodule(c.name): c for c in cands if c.post}
    seen: dict[str, list[torch.Tensor]] = {c.name: [] for c in need.values()}
    hooks = [
        m.register_forward_hook(lambda m, i, o, n=c.name: seen[n].append(i[0].detach()))
        for m, c in need.items()
    ]
    dev = _device_of(model)
    try:
        with torch.no_grad():
            for x, _ in calib[:1] if need else ():
                model(x.to(dev))
    finally:
        for h in hooks:
            h.remove()
    for c in cands:
        if not c.post:
            c.bypass = c.make(model)
            continue
        full, bare = c.make(model), c.make(model, drop_post=True)
        with torch.no_grad():
            same = all(torch.equal(full(t), bare(t)) for t in seen[c.name])
        c.bypass = bare if same else full
        c.bypass.to(dev).eval()


def _set_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def _loss(model: nn.Module, calib: Batches) -> float:
    import torch.nn.functional as F

    dev = _device_of(model)
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in calib:
            total += float(F.cross_entropy(model(x.to(dev)).float(), y.to(dev), reduction="sum"))
            n += len(y)
    return total / max(1, n)


def score_candidates(model: nn.Module, cands: list[Candidate], calib: Batches, criterion: str) -> None:
    """Fill ``score`` (lower = removed first for activation and loss; for similarity the cosine,
    higher = removed first)."""
    if not calib:
        raise StageError("drop_layers: no calibration batches to score the candidates on")
    model.eval()
    dev = _device_of(model)
    build_bypasses(model, cands, calib)
    bypasses = {c.name: c.replacement_module() for c in cands}
    if criterion == "loss":
        base = _loss(model, calib)
        for c in cands:
            old = _set_module(model, c.name, bypasses[c.name])
            try:
                c.score = _loss(model, calib) - base
            finally:
                _set_module(model, c.name, old)
        return
    acc: dict[str, list[float]] = {c.name: [0.0, 0.0, 0.0] for c in cands}
    by_mod = {model.get_submodule(c.name): c.name for c in cands}

    def hook(mod: nn.Module, inp: tuple[Any, ...], out: Any) -> None:
        name = by_mod[mod]
        b = bypasses[name](inp[0]).flatten(1).float()
        y = out.flatten(1).float()
        a = acc[name]
        if criterion == "similarity":
            a[0] += float(torch.nn.functional.cosine_similarity(y, b, dim=1, eps=1e-8).sum())
            a[2] += y.shape[0]
        else:
            a[0] += float((y - b).abs().sum())
            a[1] += float(b.abs().sum())

    hooks = [m.register_forward_hook(hook) for m in by_mod]
    try:
        with torch.no_grad():
            for x, _ in calib:
                model(x.to(dev))
    finally:
        for h in hooks:
            h.remove()
    for c in cands:
        a = acc[c.name]
        c.score = a[0] / max(1.0, a[2]) if criterion == "similarity" else a[0] / max(a[1], 1e-12)


def choose(cands: list[Candidate], n: int, criterion: str) -> list[Candidate]:
    """The ``n`` least important candidates, never one inside (or around) another chosen one."""
    order = sorted(
        cands, key=lambda c: (-(c.score or 0.0) if criterion == "similarity" else (c.score or 0.0), c.name)
    )
    chosen: list[Candidate] = []
    for c in order:
        if len(chosen) >= n:
            break
        if any(c.name.startswith(o.name + ".") or o.name.startswith(c.name + ".") for o in chosen):
            continue
        chosen.append(c)
    return chosen


def drop_layers(
    model: nn.Module,
    example: torch.Tensor,
    calib: Batches,
    *,
    criterion: str = "loss",
    count: int | None = None,
    fraction: float | None = None,
    protect: Sequence[str] = (),
) -> tuple[list[Candidate], list[Candidate]]:
    """Score the candidates and replace the least important ones in place.
    Returns (all scored candidates, the ones removed)."""
    make_pruning_permanent(model)
    model.eval()
    dev = _device_of(model)
    example = example.to(dev)
    with torch.no_grad():
        out_shape = model(example).shape
    cands = find_candidates(model, example, protect)
    if not cands:
        raise StageError(
            "no removable layer: no residual block or shape-preserving layer in an nn.Sequential "
            "outside the protected ones"
        )
    score_candidates(model, cands, calib, criterion)
    n = count if count is not None else int(math.floor((fraction or 0.0) * len(cands) + 1e-9))
    if n <= 0:
        raise StageError(f"fraction {fraction} of {len(cands)} candidate(s) rounds to no layer to remove")
    chosen = choose(cands, n, criterion)
    for c in chosen:
        _set_module(model, c.name, c.replacement_module())
    check_forward(model, example, out_shape, "after removing layers")
    return cands, chosen
