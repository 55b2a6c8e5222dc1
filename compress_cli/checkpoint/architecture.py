"""The architecture diff: how a compressed model differs structurally from its model source.

Every module whose class or constructor arguments differ from the freshly built source model
(channels removed, blocks replaced by Identity or by their shortcut path, ...) is recorded at save
time as a spec (``{"path", "class", "args"}``) and rebuilt at load time: one mechanism for every
structural stage, no per-stage code. Standard ``torch.nn`` layers are described by their
constructor arguments; other module kinds by ``register_module_spec``. torch is imported inside
the functions that need it, so the package (and the stages that register with it) imports fast.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from compress_cli.errors import SourceError

if TYPE_CHECKING:
    from torch import nn

_CONV = (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "padding_mode",
)
_BATCHNORM = ("num_features", "eps", "momentum", "affine", "track_running_stats")

# Constructor arguments read back from standard layers, so a changed layer can be rebuilt.
_CTOR_ARGS: dict[str, tuple[str, ...]] = {
    "Conv1d": _CONV,
    "Conv2d": _CONV,
    "Conv3d": _CONV,
    "ConvTranspose2d": (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "output_padding",
        "groups",
        "dilation",
        "padding_mode",
    ),
    "Linear": ("in_features", "out_features"),
    "BatchNorm1d": _BATCHNORM,
    "BatchNorm2d": _BATCHNORM,
    "BatchNorm3d": _BATCHNORM,
    "LayerNorm": ("normalized_shape", "eps", "elementwise_affine"),
    "GroupNorm": ("num_groups", "num_channels", "eps", "affine"),
    "Embedding": ("num_embeddings", "embedding_dim", "padding_idx"),
    "Identity": (),
    "PReLU": ("num_parameters",),
    # parameterless layers a structural edit may put into a new container (drop_layers' bypasses)
    "ReLU": ("inplace",),
    "ReLU6": ("inplace",),
    "SiLU": ("inplace",),
    "Hardswish": ("inplace",),
    "Hardsigmoid": ("inplace",),
    "LeakyReLU": ("negative_slope", "inplace"),
    "GELU": ("approximate",),
    "Sigmoid": (),
    "Tanh": (),
    "Dropout": ("p", "inplace"),
    "Flatten": ("start_dim", "end_dim"),
}
_HAS_BIAS = {"Conv1d", "Conv2d", "Conv3d", "ConvTranspose2d", "Linear", "LayerNorm"}

#: extra module kinds: class name -> (describe(module) -> args, build(args) -> module)
_EXTRA_SPECS: dict[str, tuple[Callable[[Any], dict[str, Any]], Callable[[dict[str, Any]], Any]]] = {}


def register_module_spec(
    class_name: str, describe: Callable[[Any], dict[str, Any]], build: Callable[[dict[str, Any]], Any]
) -> None:
    """Teach the architecture diff a module kind beyond the standard torch.nn layers:
    ``describe(module)`` -> its constructor arguments (JSON values), ``build(args)`` -> a new one.
    ``build`` must also work under ``torch.device("meta")``: loading checks the tensors of a
    rebuilt module against the stored weights before it allocates them."""
    _EXTRA_SPECS[class_name] = (describe, build)


def module_spec(m: nn.Module) -> dict[str, Any] | None:
    """``{"class": ..., "args": {...}}`` for a rebuildable module, else None."""
    cls = type(m).__name__
    if cls in _EXTRA_SPECS:
        return {"class": cls, "args": _EXTRA_SPECS[cls][0](m)}
    if cls not in _CTOR_ARGS or type(m).__module__.split(".")[0] != "torch":
        return None
    args: dict[str, Any] = {}
    for a in _CTOR_ARGS[cls]:
        v = getattr(m, a)
        args[a] = list(v) if isinstance(v, tuple) else v
    if cls in _HAS_BIAS:
        args["bias"] = getattr(m, "bias", None) is not None
    return {"class": cls, "args": args}


def container_spec(m: nn.Module) -> dict[str, Any] | None:
    """Spec of a plain ``nn.Sequential`` whose every descendant is describable (a new container put
    in place of another module, e.g. a residual block replaced by its shortcut path), else None."""
    from torch import nn

    if type(m) is not nn.Sequential:
        return None
    children = []
    for name, child in m.named_children():
        spec = module_spec(child) or container_spec(child)
        if spec is None:
            return None
        children.append({"name": name, **spec})
    return {"class": "Sequential", "args": {}, "children": children}


def _patchable_attrs(m: nn.Module) -> dict[str, Any]:
    """Plain public attributes of a module (ints, floats, strings, tuples of them)."""
    out: dict[str, Any] = {}
    for k, v in vars(m).items():
        if k.startswith("_") or k == "training":
            continue
        if isinstance(v, (bool, int, float, str, type(None))):
            out[k] = v
        elif isinstance(v, (tuple, list)) and all(isinstance(x, (bool, int, float, str)) for x in v):
            out[k] = list(v)
    return out


def _own_tensor_shapes(m: nn.Module) -> dict[str, list[int]]:
    own = {**m._parameters, **m._buffers}
    return {k: list(v.shape) for k, v in own.items() if v is not None}


def patch_spec(base: nn.Module, current: nn.Module) -> dict[str, Any] | None:
    """For a module of unchanged class that has no constructor spec: the plain attributes and own
    tensor shapes that differ from ``base`` (e.g. a MultiheadAttention whose embed_dim was pruned,
    a block that stores its channel count), or None when nothing differs."""
    a, b = _patchable_attrs(current), _patchable_attrs(base)
    attrs = {k: v for k, v in a.items() if k in b and b[k] != v}
    ts, tb = _own_tensor_shapes(current), _own_tensor_shapes(base)
    tensors = {k: v for k, v in ts.items() if k in tb and tb[k] != v}
    if not attrs and not tensors:
        return None
    return {"class": "__patch__", "args": {"attrs": attrs, "tensors": tensors}}


def _apply_patch(m: nn.Module, args: dict[str, Any], path: str, stored: Mapping[str, Any] | None) -> None:
    import torch
    from torch import nn

    plain = _patchable_attrs(m)
    for k, v in args.get("attrs", {}).items():
        if k not in plain:
            raise SourceError(
                f"manifest patches {k!r} of module {path!r} ({type(m).__name__}), which is not a plain "
                "attribute of it"
            )
        old = getattr(m, k, None)
        setattr(m, k, tuple(v) if isinstance(old, tuple) and isinstance(v, list) else v)
    for k, shape in args.get("tensors", {}).items():
        if stored is not None:
            key = f"{path}.{k}" if path else k
            _check_stored(key, shape, stored, k in m._non_persistent_buffers_set, path)
        p, b = m._parameters.get(k), m._buffers.get(k)
        if p is not None:
            m._parameters[k] = nn.Parameter(torch.zeros(shape, dtype=p.dtype), requires_grad=p.requires_grad)
        elif b is not None:
            m._buffers[k] = torch.zeros(shape, dtype=b.dtype)
        else:
            raise SourceError(
                f"manifest resizes tensor {k!r} of a {type(m).__name__}, which it does not have"
            )


def build_module(spec: dict[str, Any]) -> nn.Module:
    """A fresh module (random init) from a ``module_spec`` / ``container_spec`` entry."""
    from torch import nn

    cls = spec["class"]
    if cls == "Sequential" and "children" in spec:
        from collections import OrderedDict

        return nn.Sequential(OrderedDict((c["name"], build_module(c)) for c in spec["children"]))
    if cls in _EXTRA_SPECS:
        return _EXTRA_SPECS[cls][1](spec["args"])
    if cls not in _CTOR_ARGS:
        raise SourceError(f"manifest names module class {cls!r}, which this version cannot rebuild")
    args = {
        k: tuple(v) if isinstance(v, list) and k != "normalized_shape" else v for k, v in spec["args"].items()
    }
    return getattr(nn, cls)(**args)


def architecture_diff(base: nn.Module, current: nn.Module) -> list[dict[str, Any]]:
    """Modules of ``current`` that differ from ``base``, outermost first, as rebuild specs.

    A changed module with constructor arguments is rebuilt from them; a new plain ``nn.Sequential``
    is rebuilt from its children's specs; a module of unchanged class without constructor spec whose
    plain attributes or own tensor shapes changed is patched in place (``__patch__``)."""
    base_mods = dict(base.named_modules())
    diff: list[dict[str, Any]] = []
    replaced: list[str] = []
    for name, mod in current.named_modules():
        if any(name.startswith(p + ".") for p in replaced):
            continue
        ref = base_mods.get(name)
        spec = module_spec(mod)
        if ref is not None and type(ref) is type(mod) and spec is None:
            patch = patch_spec(ref, mod)
            if patch is not None:
                diff.append({"path": name, **patch})
            continue
        if not name or (ref is not None and type(ref) is type(mod) and spec == module_spec(ref)):
            continue
        if spec is None:
            spec = container_spec(mod)
        if spec is None:
            raise SourceError(
                f"module {name!r} ({type(mod).__name__}) differs from the model source and cannot be "
                "described in the manifest; register it with compress_cli.checkpoint.register_module_spec"
            )
        diff.append({"path": name, **spec})
        replaced.append(name)
    cur_names = {n for n, _ in current.named_modules()}
    for name in base_mods:
        parent = name.rpartition(".")[0]
        if (
            name
            and name not in cur_names
            and (not parent or parent in cur_names)
            and not any(name.startswith(p + ".") for p in replaced)
        ):
            diff.append({"path": name, "class": "__deleted__", "args": {}})
    return diff


def _submodule(model: nn.Module, name: str, path: str) -> nn.Module:
    """``model``'s submodule ``name`` ("" is the model), or a SourceError about manifest entry ``path``."""
    try:
        return model.get_submodule(name) if name else model
    except AttributeError:
        raise SourceError(f"manifest edits module {path!r}, which the model source does not have") from None


def apply_architecture_diff(
    model: nn.Module, diff: list[dict[str, Any]], stored: Mapping[str, Any] | None = None
) -> nn.Module:
    """Replay ``architecture_diff`` entries on a freshly built source model (in place; returns it).

    ``stored``: the weights the result will load (name -> tensor). Given, every tensor an entry
    creates must be one of them with the same shape, checked before it is allocated (a rebuilt
    module is first built on the meta device), so a manifest cannot make the loader allocate
    more than the weights file holds.
    """
    for item in diff:
        path = item["path"]
        if item["class"] == "__patch__":
            _apply_patch(_submodule(model, path, path), item["args"], path, stored)
            continue
        parent_name, _, child = path.rpartition(".")
        parent = _submodule(model, parent_name, path)
        if child not in parent._modules and (item["class"] == "__deleted__" or hasattr(parent, child)):
            raise SourceError(f"manifest edits {path!r}, which is not a module of the model source")
        if item["class"] == "__deleted__":
            delattr(parent, child)
        else:
            setattr(parent, child, _checked_build(item, path, stored))
    return model


def _checked_build(item: dict[str, Any], path: str, stored: Mapping[str, Any] | None) -> nn.Module:
    """``build_module(item)``; with ``stored``, only once a meta-device build showed that its
    tensors are the stored ones. Constructor errors (bad arguments) become SourceErrors."""
    import torch

    try:
        if stored is not None:
            with torch.device("meta"):
                probe = build_module(item)
            for k, t in probe.state_dict().items():
                _check_stored(f"{path}.{k}", list(t.shape), stored, False, path)
        return build_module(item)
    except (TypeError, ValueError, RuntimeError) as e:
        first = (str(e).splitlines() or [""])[0]
        raise SourceError(
            f"manifest architecture entry {path!r} ({item['class']}): cannot build it "
            f"({type(e).__name__}: {first})"
        ) from None


def _check_stored(key: str, shape: list[int], stored: Mapping[str, Any], transient: bool, path: str) -> None:
    """A tensor of ``shape`` that an architecture entry creates must be the stored tensor ``key``;
    a buffer that is not saved (``transient``) may not be larger than the largest stored tensor."""
    n = math.prod(shape)
    if transient:
        if n > max((t.numel() for t in stored.values()), default=0):
            raise SourceError(f"manifest makes tensor {key!r} of {n:,} elements, more than the weights hold")
    elif key not in stored or list(stored[key].shape) != list(shape):
        got = "missing" if key not in stored else f"stored {list(stored[key].shape)}"
        raise SourceError(
            f"manifest architecture entry {path!r} does not match the weights: {key} {list(shape)} ({got})"
        )


# --------------------------------------------------------------------------- reading a manifest
#: bounds on what a manifest's architecture may say (it is untrusted data): entries, nesting, the
#: ints passed to a layer constructor (sizes, strides, groups) and the rank of a patched tensor
MAX_ENTRIES = 100_000
MAX_DEPTH = 32
MAX_INT = 2**31 - 1
MAX_RANK = 8
_SCALARS = (bool, int, float, str, type(None))


def architecture_problems(entries: object) -> list[str]:
    """What is wrong with a manifest's ``architecture`` list, one located line each: only the
    entry kinds ``architecture_diff`` writes, of module classes this version can rebuild (standard
    layers, ``register_module_spec``), with plain, bounded constructor arguments."""
    if not isinstance(entries, list):
        return [f"architecture: must be a list (got {type(entries).__name__})"]
    if len(entries) > MAX_ENTRIES:
        return [f"architecture: {len(entries):,} entries, more than the {MAX_ENTRIES:,} allowed"]
    problems: list[str] = []
    for i, entry in enumerate(entries):
        problems += _entry_problems(entry, f"architecture[{i}]", 0)
    return problems


def _entry_problems(entry: object, where: str, depth: int) -> list[str]:
    if not isinstance(entry, dict):
        return [f"{where}: must be a mapping"]
    key = "name" if depth else "path"
    name, cls, args = entry.get(key), entry.get("class"), entry.get("args", {})
    if not isinstance(name, str) or len(name) > 1000 or (name and "" in name.split(".")):
        return [f"{where}.{key}: must be a dotted module name"]
    if not name and (depth or cls != "__patch__"):
        return [f"{where}.{key}: must name a module (only a __patch__ edits the whole model)"]
    if not isinstance(args, dict):
        return [f"{where}.args: must be a mapping"]
    if cls == "__deleted__" and not depth:
        return []
    if cls == "__patch__" and not depth:
        return _patch_problems(args, where)
    if cls == "Sequential":
        children = entry.get("children")
        if not isinstance(children, list) or len(children) > MAX_ENTRIES or depth >= MAX_DEPTH:
            return [f"{where}.children: must be a list of at most {MAX_ENTRIES:,} modules, {MAX_DEPTH} deep"]
        return [
            p for i, c in enumerate(children) for p in _entry_problems(c, f"{where}.children[{i}]", depth + 1)
        ]
    if isinstance(cls, str) and cls in _EXTRA_SPECS:
        return []  # its registered build reads the arguments
    if not isinstance(cls, str) or cls not in _CTOR_ARGS:
        return [f"{where}.class: module class {cls!r} is not one this version can rebuild"]
    allowed = set(_CTOR_ARGS[cls]) | ({"bias"} if cls in _HAS_BIAS else set())
    problems = [f"{where}.args.{k}: not an argument of {cls}" for k in args if k not in allowed]
    problems += [
        f"{where}.args.{k}: {p}" for k, v in args.items() if k in allowed for p in _plain_problems(v)
    ]
    return problems


def _patch_problems(args: dict[str, Any], where: str) -> list[str]:
    attrs, tensors = args.get("attrs", {}), args.get("tensors", {})
    if not isinstance(attrs, dict) or not isinstance(tensors, dict) or set(args) - {"attrs", "tensors"}:
        return [f"{where}.args: a __patch__ holds an attrs and a tensors mapping only"]
    problems = [f"{where}.args.attrs.{k}: {p}" for k, v in attrs.items() for p in _plain_problems(v)]
    problems += [f"{where}.args.attrs.{k}: not a plain attribute name" for k in attrs if k.startswith("_")]
    for k, shape in tensors.items():
        if not (
            isinstance(shape, list)
            and len(shape) <= MAX_RANK
            and all(type(d) is int and 0 <= d <= MAX_INT for d in shape)
        ):
            problems.append(f"{where}.args.tensors.{k}: must be a shape (at most {MAX_RANK} sizes)")
    return problems


def _plain_problems(value: object) -> list[str]:
    """A constructor argument or patched attribute: a scalar or a short list of scalars."""
    items = value if isinstance(value, list) and len(value) <= MAX_RANK else [value]
    if not all(isinstance(v, _SCALARS) for v in items):
        return [f"must be a number, string, boolean, null or a short list of them (got {value!r:.60})"]
    if any(type(v) is int and abs(v) > MAX_INT for v in items) or any(
        isinstance(v, str) and len(v) > 256 for v in items
    ):
        return [f"out of range (got {value!r:.60})"]
    return []
