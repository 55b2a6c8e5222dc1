"""Proof that a structural edit did what it claims: compare the edited model with a reference copy
of the model before the edit, on a real batch, module by module.

- Channel removal (:func:`zeroed_reference`): the reference is the model before removal with every
  removed channel zeroed where it is produced (the outputs of every producing layer and norm of the
  torch-pruning group, the unwrapped parameters that add into it) and where it is consumed (the
  consumers' inputs), and with every layer norm over the pruned dimension computing its statistics
  over the kept channels only. Zeroing at the consumers makes the reference independent of what
  activations do to zero (``sigmoid(0) = 0.5``); the masked statistics make it the exact meaning of
  "these channels are gone" for a residual stream under layer norms. A removal the dependency graph
  got wrong (a flatten after a permute, a custom reshape, a channel indexed by position) gives a
  different output and is caught, whatever the model.
- Layer removal (:func:`bypassed_reference`): the reference computes each removed module's bypass
  from the module's own input inside the unchanged model; the edited model has the module replaced.

:func:`compare` runs both models with a forward hook on every module and, when the outputs differ
by more than :data:`REL_TOL` x max|reference| + :data:`ABS_TOL`, names the first module (in the
order their calls finish) whose output has the same shape in both models and differs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compress_cli._utils.batches import batch_size, call, float_tensors

#: relative tolerance of the exactness checks (times the largest |reference output|)
REL_TOL = 1e-4
#: absolute tolerance added to the relative one (outputs that are all about zero)
ABS_TOL = 1e-5
#: samples the stages check on
CHECK_SAMPLES = 4


@dataclass
class Exactness:
    """The outcome of :func:`compare`: the largest absolute difference between the final outputs,
    the tolerance it was held to, the batch size, and the first diverging module (None if exact)."""

    max_abs_diff: float
    tolerance: float
    samples: int
    first_divergence: str | None = None

    @property
    def exact(self) -> bool:
        """True when the outputs agree within the tolerance."""
        return self.max_abs_diff <= self.tolerance

    def as_dict(self) -> dict[str, Any]:
        """The report entry (``details.exactness`` of a structural stage)."""
        out: dict[str, Any] = {
            "max_abs_diff": self.max_abs_diff,
            "tolerance": self.tolerance,
            "samples": self.samples,
        }
        if self.first_divergence is not None:
            out["first_divergence"] = self.first_divergence
        return out


# --------------------------------------------------------------------------- comparison
def tolerance(reference: Sequence[torch.Tensor]) -> float:
    """:data:`REL_TOL` x max|reference| + :data:`ABS_TOL`."""
    peak = max((float(t.detach().abs().max()) for t in reference if t.numel()), default=0.0)
    return REL_TOL * peak + ABS_TOL


def max_diff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """Largest |a - b| over paired tensors; infinite when their number or shapes differ."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=True)):
        return float("inf")
    diffs = [
        float((x.detach().double() - y.detach().double()).abs().max())
        for x, y in zip(a, b, strict=True)
        if x.numel()
    ]
    return max(diffs, default=0.0)


def _record(model: nn.Module, inputs: Any) -> tuple[list[torch.Tensor], list[tuple[str, list[torch.Tensor]]]]:
    """The final output tensors and, in the order module calls finish, (name, output tensors)."""
    calls: list[tuple[str, list[torch.Tensor]]] = []
    hooks = [
        m.register_forward_hook(
            lambda _m, _i, o, n=name: calls.append((n, [t.detach() for t in float_tensors(o)]))
        )
        for name, m in model.named_modules()
        if name
    ]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = [t.detach() for t in float_tensors(call(model, inputs))]
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return out, calls


def compare(reference: nn.Module, candidate: nn.Module, inputs: Any) -> Exactness:
    """Run both models on ``inputs`` (eval mode, no gradients) and compare their outputs; when
    they differ, locate the first module whose output (same name, same call, same shape) differs."""
    ref_out, ref_calls = _record(reference, inputs)
    out, calls = _record(candidate, inputs)
    tol = tolerance(ref_out)
    result = Exactness(max_diff(ref_out, out), tol, batch_size(inputs))
    if result.exact:
        return result
    by_name: dict[str, list[list[torch.Tensor]]] = {}
    for name, ts in ref_calls:
        by_name.setdefault(name, []).append(ts)
    seen: dict[str, int] = {}
    for name, ts in calls:
        k = seen[name] = seen.get(name, -1) + 1
        refs = by_name.get(name, [])
        if k >= len(refs) or not ts or len(refs[k]) != len(ts):
            continue
        if any(a.shape != b.shape for a, b in zip(refs[k], ts, strict=True)):
            continue
        if max_diff(refs[k], ts) > tolerance(refs[k]):
            result.first_divergence = name
            return result
    result.first_divergence = "the model's output"
    return result


# --------------------------------------------------------------------------- channel removal
@dataclass
class Removal:
    """One dependency of a torch-pruning group: module (or unwrapped parameter) ``name`` loses
    channels ``idxs`` on its output (``out``) or input side."""

    name: str
    out: bool
    idxs: list[int]
    param_dim: int | None = None  # an unwrapped parameter: the dimension pruned


def plan_of(model: nn.Module, groups: Sequence[Any], graph: Any) -> list[list[Removal]]:
    """The removals the torch-pruning ``groups`` will make, one list per group, named in ``model``
    (computed before they are pruned; torch-pruning's internal ops are not modules of the model
    and are skipped)."""
    names = {id(m): n for n, m in model.named_modules()}
    params = {id(p): n for n, p in model.named_parameters()}
    dims = {id(u.parameters): u.pruning_dim for u in getattr(graph, "unwrapped_parameters", [])}
    plan: list[list[Removal]] = []
    for group in groups:
        plan.append([])
        for item in group:
            dep, idxs = item[0], item[1]
            target = dep.target.module
            ids = sorted({int(i) for i in idxs})
            if not ids:
                continue
            out = bool(graph.is_out_channel_pruning_fn(dep.handler))
            if isinstance(target, nn.Parameter) and id(target) in params:
                plan[-1].append(
                    Removal(params[id(target)], True, ids, dims.get(id(target), target.dim() - 1))
                )
            elif id(target) in names and names[id(target)]:
                plan[-1].append(Removal(names[id(target)], out, ids))
    return plan


_CHANNEL_FIRST = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.PReLU,
)


def _channel_dim(mod: nn.Module, t: torch.Tensor, width: int) -> int:
    """Where ``mod`` keeps its channels in tensor ``t``: dimension 1 for convs and batch norms
    (and channel-first layer norms), the last one otherwise."""
    if isinstance(mod, _CHANNEL_FIRST):
        return 1
    if t.dim() > 2 and t.shape[-1] != width and t.shape[1] == width:
        return 1
    return t.dim() - 1


def _zero(t: torch.Tensor, dim: int, idxs: torch.Tensor) -> torch.Tensor:
    if not t.is_floating_point() or dim >= t.dim() or int(idxs.max()) >= t.shape[dim]:
        return t
    return t.index_fill(dim, idxs.to(t.device), 0.0)


def _masked_layer_norm(
    mod: nn.LayerNorm, x: torch.Tensor, out: torch.Tensor, removed: torch.Tensor
) -> torch.Tensor:
    """``mod`` over the kept channels only (the removed ones read as zero): what a layer norm whose
    channels were removed computes, laid out in the full width."""
    width = int(mod.normalized_shape[-1])
    dim = _channel_dim(mod, out, width)
    keep_mask = torch.ones(width, dtype=torch.bool, device=x.device)
    keep_mask[removed.to(x.device)] = False
    keep = keep_mask.nonzero().flatten()
    xk = x.index_select(dim, keep).float()
    mean = xk.mean(dim, keepdim=True)
    var = xk.var(dim, unbiased=False, keepdim=True)
    y = (xk - mean) / torch.sqrt(var + mod.eps)
    shape = [1] * x.dim()
    shape[dim] = len(keep)
    if mod.weight is not None:
        y = y * mod.weight.detach()[keep].reshape(shape)
    if mod.bias is not None:
        y = y + mod.bias.detach()[keep].reshape(shape)
    full = torch.zeros_like(out)
    return full.index_copy(dim, keep, y.to(out.dtype))


def _input_hook(idxs: torch.Tensor, width: int) -> Callable[..., Any]:
    def hook(mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(
            _zero(a, _channel_dim(mod, a, width), idxs) if isinstance(a, torch.Tensor) else a for a in args
        )

    return hook


def _output_hook(idxs: torch.Tensor, width: int) -> Callable[..., Any]:
    def hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
        if isinstance(mod, nn.LayerNorm) and len(mod.normalized_shape) == 1 and isinstance(out, torch.Tensor):
            return _masked_layer_norm(mod, args[0], out, idxs)
        if isinstance(out, torch.Tensor):
            return _zero(out, _channel_dim(mod, out, width), idxs)
        if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):  # MultiheadAttention
            return (_zero(out[0], _channel_dim(mod, out[0], width), idxs), *out[1:])
        return out

    return hook


def _width(mod: nn.Module, out: bool) -> int:
    attrs: tuple[str, ...] = ("out_channels", "out_features", "num_features", "num_channels", "embed_dim")
    if not out:
        attrs = ("in_channels", "in_features", "num_features", "embed_dim")
    for a in attrs:
        if isinstance(v := getattr(mod, a, None), int):
            return v
    if isinstance(mod, nn.LayerNorm):
        return int(mod.normalized_shape[-1])
    w = getattr(mod, "weight", None)
    return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.dim() else -1


@contextlib.contextmanager
def zeroed_reference(model: nn.Module, plan: Sequence[Sequence[Removal]]) -> Iterator[nn.Module]:
    """``model`` (the unpruned copy) acting, inside the ``with``, as if the channels of ``plan``
    were removed: the removed channels zeroed at every producer and consumer, layer-norm
    statistics over the kept channels. Hooks and zeroed parameter slices are undone on exit."""
    handles = []
    saved: list[tuple[nn.Parameter, torch.Tensor]] = []
    try:
        for r in (r for group in plan for r in group):
            idxs = torch.tensor(r.idxs, dtype=torch.long)
            if r.param_dim is not None:
                p = model.get_parameter(r.name)
                saved.append((p, p.detach().clone()))
                with torch.no_grad():
                    p.index_fill_(r.param_dim, idxs.to(p.device), 0.0)
                continue
            mod = model.get_submodule(r.name)
            width = _width(mod, r.out)
            if r.out:
                handles.append(mod.register_forward_hook(_output_hook(idxs, width)))
            else:
                handles.append(mod.register_forward_pre_hook(_input_hook(idxs, width)))
        yield model
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for param, value in saved:
                param.copy_(value)


# --------------------------------------------------------------------------- layer removal
@contextlib.contextmanager
def bypassed_reference(model: nn.Module, bypasses: Mapping[str, nn.Module]) -> Iterator[nn.Module]:
    """``model`` (unchanged) with each named module's output replaced, inside the ``with``, by its
    bypass applied to the module's own input: what replacing the module should compute."""

    def hook(bypass: nn.Module) -> Callable[..., Any]:
        def run(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], _out: Any) -> Any:
            return bypass(*args, **kwargs)

        return run

    handles = [
        model.get_submodule(name).register_forward_hook(hook(b), with_kwargs=True)
        for name, b in bypasses.items()
    ]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def restored_on_failure(model: nn.Module) -> Iterator[None]:
    """Inside, an edit of ``model`` that raises (a refused or failed removal) leaves it as it was."""
    from compress_cli.checkpoint import copy_model

    backup = copy_model(model)  # deepcopy, which masked (torch.nn.utils.prune) weights break
    try:
        yield
    except BaseException:
        restore(model, backup)
        raise


def restore(model: nn.Module, backup: nn.Module) -> None:
    """Make ``model`` (the same object) the ``backup`` copy again after a refused edit."""
    model.__dict__.clear()
    model.__dict__.update(backup.__dict__)
