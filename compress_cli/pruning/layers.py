"""Layer removal (``drop_layers``): replace whole residual blocks or shape-preserving layers by
their bypass, least important first.

Candidates are found in one forward pass plus a torch.fx trace per block (a residual block ends in
``post(main(x) + shortcut(x))``); each gets a bypass module (identity, or the block's shortcut path
when shapes change), a score on calibration batches (loss increase, relative activation change or
cosine similarity), and :func:`choose` picks the least important non-nested ones. The removal is
proven exact against the unchanged model with the removed modules bypassed in place, or refused
and undone. The checkpoint's architecture diff records the swapped modules, so the model reloads
without per-stage code.
"""

from __future__ import annotations

import math
import operator
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compress_cli._utils.batches import batch_size, call, to_device
from compress_cli._utils.modules import device_of, matches_any, output_layers, set_submodule
from compress_cli.errors import StageError
from compress_cli.pruning.common import Batches, check_forward, output_shapes
from compress_cli.pruning.exactness import Exactness, bypassed_reference, compare, restored_on_failure
from compress_cli.pruning.unstructured import make_permanent

if TYPE_CHECKING:
    from compress_cli.tasks.base import Task

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


@dataclass
class Candidate:
    """A module that can be removed: replaced by ``make()`` (identity or its shortcut path)."""

    name: str
    kind: str  # "residual" | "layer"
    replacement: str  # "identity" | "passthrough" | "shortcut:<child>"
    post: list[nn.Module] = field(default_factory=list)  # ops after the residual add (e.g. ReLU)
    score: float | None = None
    params: int = 0
    bypass: nn.Module | None = field(default=None, repr=False)  # the replacement, once built

    def replacement_module(self) -> nn.Module:
        """The bypass :func:`build_bypasses` chose for this candidate."""
        if self.bypass is None:
            raise StageError(f"{self.name}: no replacement built (call build_bypasses first)")
        return self.bypass

    def make(self, model: nn.Module, drop_post: bool = False) -> nn.Module:
        """Build a fresh bypass for this candidate in ``model``: identity or the shortcut path,
        followed by copies of the post-add ops unless ``drop_post``."""
        mod = model.get_submodule(self.name)
        post = [] if drop_post else [_fresh(p) for p in self.post]
        if self.replacement == "passthrough":  # called with more than the tensor it passes on
            from compress_cli.checkpoint.modules import PassThrough

            return PassThrough()
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


#: why a replacement module could not be saved (None: it can): ``(module, path) -> problem``
Describer = Callable[[nn.Module, str], "str | None"]


def find_candidates(
    model: nn.Module,
    example: Any,
    protect: Sequence[str] = (),
    *,
    describe: Describer | None = None,
    left_out: list[tuple[str, str]] | None = None,
) -> list[Candidate]:
    """Residual blocks (replaceable by identity or their shortcut) and shape-preserving layers with
    parameters inside ``nn.Sequential`` stacks; never the output layer or ``protect`` globs.

    A layer stack kept in an ``nn.ModuleList`` (a transformer's encoder layers) counts too: a
    shape-preserving child called once, whose input is its previous sibling's output or whose
    output is its next sibling's input (the loop ``x = layer(x, mask, ...)``), is a layer
    candidate. One called with more than that tensor gets a ``PassThrough`` bypass (its first
    argument, the others ignored) instead of ``nn.Identity``.

    ``describe`` (e.g. the checkpoint manifest's ``describe_problem``): candidates whose bypass it
    rejects are left out (a removal the run could not save), and listed in ``left_out`` as
    ``(name, problem)`` when given."""
    out_layer = set(output_layers(model, example))
    shapes: dict[str, tuple[Any, Any]] = {}
    calls: dict[str, int] = {}
    extra_args: set[str] = set()  # called with more than one tensor argument
    io: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # ModuleList children: (input, output)
    hooks = []
    names = {m: n for n, m in model.named_modules()}
    in_list = {
        f"{pn}.{cn}" if pn else cn
        for pn, pm in model.named_modules()
        if isinstance(pm, nn.ModuleList)
        for cn, _ in pm.named_children()
    }

    def hook(mod: nn.Module, inp: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        name = names[mod]
        calls[name] = calls.get(name, 0) + 1
        if inp and isinstance(inp[0], torch.Tensor) and isinstance(out, torch.Tensor):
            shapes.setdefault(name, (tuple(inp[0].shape), tuple(out.shape)))
            if name in in_list:
                io.setdefault(name, (inp[0], out))
        if len(inp) > 1 or kwargs:
            extra_args.add(name)

    for name, mod in model.named_modules():
        if name:
            hooks.append(mod.register_forward_hook(hook, with_kwargs=True))
    try:
        model.eval()
        with torch.no_grad():
            call(model, example)
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
        elif same and calls.get(name) == 1 and _chained(name, io) and not isinstance(mod, _NORMS):
            bypass = "passthrough" if name in extra_args else "identity"
            cands.append(Candidate(name, "layer", bypass, params=n_params))
    cands = _dedupe(cands)
    if describe is None:
        return cands
    kept = []
    for c in cands:
        problem = describe(c.make(model), c.name)
        if problem is None:
            kept.append(c)
        elif left_out is not None:
            left_out.append((c.name, problem))
    return kept


def _chained(name: str, io: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Whether ModuleList child ``name`` takes its previous sibling's output or feeds its next
    sibling (the same tensor object: a sequential stack, not parallel branches)."""
    if name not in io:
        return False
    parent, _, idx = name.rpartition(".")
    if not idx.isdigit():
        return False
    prefix = f"{parent}." if parent else ""
    prev, nxt = io.get(f"{prefix}{int(idx) - 1}"), io.get(f"{prefix}{int(idx) + 1}")
    return (prev is not None and io[name][0] is prev[1]) or (nxt is not None and nxt[0] is io[name][1])


def unsaveable_note(left_out: Sequence[tuple[str, str]]) -> str:
    """``; N candidate(s) left out ...`` for a message about candidates ``describe`` rejected."""
    if not left_out:
        return ""
    name, problem = left_out[0]
    more = f" and {len(left_out) - 1} more" if len(left_out) > 1 else ""
    return (
        f"; {len(left_out)} candidate(s) left out because the checkpoint could not save their "
        f"replacement ({name!r}{more}: {problem})"
    )


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
    dev = device_of(model)
    try:
        with torch.no_grad():
            for x, _ in calib[:1] if need else ():
                call(model, to_device(x, dev))
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


def _loss(model: nn.Module, calib: Batches, task: Task | None) -> float:
    """The mean loss over the calibration batches: the task's (against the original model's
    outputs when it compares with them), or cross-entropy on the logits without a task."""
    import torch.nn.functional as F

    dev = device_of(model)
    total, n = 0.0, 0
    with torch.no_grad():
        for i, (x, y) in enumerate(calib):
            x = to_device(x, dev)
            y = to_device(y, dev) if y is not None else None
            if task is None:
                if y is None:
                    raise StageError("drop_layers: importance 'loss' without a task needs labelled batches")
                total += float(F.cross_entropy(call(model, x).float(), y, reduction="sum"))
                n += len(y)
                continue
            ref = task.reference_output(x, ("calibration", i)) if task.needs_reference else None
            k = batch_size(x)
            total += float(task.loss(task.forward(model, x).float(), y, ref)) * k
            n += k
    return total / max(1, n)


def _outputs(model: nn.Module, calib: Batches, task: Task | None) -> list[torch.Tensor]:
    """The model's (task-selected) output on each calibration batch, flattened per sample."""
    dev = device_of(model)
    outs = []
    with torch.no_grad():
        for x, _ in calib:
            x = to_device(x, dev)
            out = task.forward(model, x) if task is not None else call(model, x)
            if not isinstance(out, torch.Tensor):
                raise StageError(
                    "drop_layers: importance 'output' needs a tensor output; set the task's output"
                )
            outs.append(out.float().reshape(out.shape[0], -1))
    return outs


def score_candidates(
    model: nn.Module, cands: list[Candidate], calib: Batches, criterion: str, task: Task | None = None
) -> None:
    """Fill ``score`` (lower = removed first for activation, loss and output; for similarity the
    cosine, higher = removed first). ``loss`` is the task's training loss (cross-entropy without a
    task) on the calibration batches with the candidate bypassed minus without; ``output`` is
    1 - the mean cosine between the model's (task-selected) output with the candidate bypassed
    and without (label-free: how far bypassing moves the model's output)."""
    if not calib:
        raise StageError("drop_layers: no calibration batches to score the candidates on")
    model.eval()
    dev = device_of(model)
    build_bypasses(model, cands, calib)
    bypasses = {c.name: c.replacement_module() for c in cands}
    if criterion in ("loss", "output"):
        if criterion == "loss":
            base = _loss(model, calib, task)
        else:
            ref_outs = _outputs(model, calib, task)
        for c in cands:
            old = set_submodule(model, c.name, bypasses[c.name])
            try:
                if criterion == "loss":
                    c.score = _loss(model, calib, task) - base
                else:
                    cos = [
                        torch.nn.functional.cosine_similarity(o, r, dim=1, eps=1e-12)
                        for o, r in zip(_outputs(model, calib, task), ref_outs, strict=True)
                    ]
                    c.score = 1.0 - float(torch.cat(cos).mean())
            finally:
                set_submodule(model, c.name, old)
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
                call(model, to_device(x, dev))
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
    example: Any,
    calib: Batches,
    *,
    criterion: str = "loss",
    count: int | None = None,
    fraction: float | None = None,
    protect: Sequence[str] = (),
    check_inputs: Any = None,
    task: Task | None = None,
    describe: Describer | None = None,
) -> tuple[list[Candidate], list[Candidate], Exactness]:
    """Score the candidates (``task``: whose loss and output selection ``loss``/``output`` scores
    use, see :func:`score_candidates`) and replace the least important ones in place.

    The replacement is proven exact: on ``check_inputs`` (default ``example``) the edited model must
    compute what the model before it computes with each removed module's output replaced by its
    bypass of the module's own input (:func:`~compress_cli.pruning.exactness.bypassed_reference`);
    otherwise StageError names the first diverging module and the model is left as it was.
    ``describe``: as for :func:`find_candidates` (candidates the run could not save are left out).
    Returns (all scored candidates, the ones removed, the check)."""
    with restored_on_failure(model):
        return _drop_in_place(
            model, example, calib, criterion, count, fraction, protect, check_inputs, task, describe
        )


def _drop_in_place(
    model: nn.Module,
    example: Any,
    calib: Batches,
    criterion: str,
    count: int | None,
    fraction: float | None,
    protect: Sequence[str],
    check_inputs: Any,
    task: Task | None = None,
    describe: Describer | None = None,
) -> tuple[list[Candidate], list[Candidate], Exactness]:
    """:func:`drop_layers` without the restore on failure."""
    import copy

    make_permanent(model)
    model.eval()
    dev = device_of(model)
    example = to_device(example, dev)
    check = example if check_inputs is None else to_device(check_inputs, dev)
    out_shape = output_shapes(model, example)
    left_out: list[tuple[str, str]] = []
    cands = find_candidates(model, example, protect, describe=describe, left_out=left_out)
    if not cands:
        raise StageError(
            "no removable layer: no residual block or shape-preserving layer in an nn.Sequential "
            "or nn.ModuleList stack "
            "outside the protected ones" + unsaveable_note(left_out)
        )
    score_candidates(model, cands, calib, criterion, task)
    n = count if count is not None else int(math.floor((fraction or 0.0) * len(cands) + 1e-9))
    if n <= 0:
        raise StageError(f"fraction {fraction} of {len(cands)} candidate(s) rounds to no layer to remove")
    chosen = choose(cands, n, criterion)
    from compress_cli.checkpoint import copy_model

    reference = copy_model(model)  # deepcopy that survives cached non-leaf tensors
    bypasses = {c.name: copy.deepcopy(c.replacement_module()) for c in chosen}
    for c in chosen:
        set_submodule(model, c.name, c.replacement_module())
    check_forward(model, example, out_shape, "after removing layers")
    with bypassed_reference(reference, bypasses) as ref:
        res = compare(ref, model, check)
    if not res.exact:
        raise StageError(
            f"layer removal is not exact: replacing {', '.join(repr(c.name) for c in chosen)} by "
            f"{'its bypass' if len(chosen) == 1 else 'their bypasses'} changes the output by "
            f"{res.max_abs_diff:.3g} beyond bypassing {'it' if len(chosen) == 1 else 'them'} in place "
            f"(tolerance {res.tolerance:.3g}, {res.samples} samples), first at '{res.first_divergence}': "
            "the model's forward uses the module other than by calling it once. The model was left "
            f"unchanged; keep it with protect: [{', '.join(c.name for c in chosen)}]"
        )
    return cands, chosen, res
