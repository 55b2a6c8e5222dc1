"""The architecture diff: how a compressed model differs structurally from its model source.

Every module whose class or constructor arguments differ from the freshly built source model
(channels removed, blocks replaced by Identity or by their shortcut path, ...) is recorded at save
time as a spec (``{"path", "class", "args"}``) and rebuilt at load time: one mechanism for every
structural stage, no per-stage code. Standard ``torch.nn`` layers are described by their
constructor arguments; other module kinds by ``register_module_spec``. torch is imported inside
the functions that need it, so the package (and the stages that register with it) imports fast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from compress_cli.errors import SourceError

if TYPE_CHECKING:
    from torch import nn

# Constructor arguments read back from standard layers, so a changed layer can be rebuilt.
_CTOR_ARGS: dict[str, tuple[str, ...]] = {
    "Conv1d": (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
    ),
    "Conv2d": (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
    ),
    "Conv3d": (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
    ),
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
    "BatchNorm1d": ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    "BatchNorm2d": ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    "BatchNorm3d": ("num_features", "eps", "momentum", "affine", "track_running_stats"),
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
    """Teach the architecture diff a module kind beyond the standard torch.nn layers."""
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


def _apply_patch(m: nn.Module, args: dict[str, Any]) -> None:
    import torch
    from torch import nn

    for k, v in args.get("attrs", {}).items():
        old = getattr(m, k, None)
        setattr(m, k, tuple(v) if isinstance(old, tuple) and isinstance(v, list) else v)
    for k, shape in args.get("tensors", {}).items():
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
                f"module {name!r} ({type(mod).__name__}) differs from the model source and cannot be described "
                "in the manifest; register it with compress_cli.checkpoint.register_module_spec"
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


def apply_architecture_diff(model: nn.Module, diff: list[dict[str, Any]]) -> nn.Module:
    """Replay ``architecture_diff`` entries on a freshly built source model (in place; returns it)."""
    for item in diff:
        path = item["path"]
        if item["class"] == "__patch__":
            try:
                target = model.get_submodule(path) if path else model
            except AttributeError:
                raise SourceError(
                    f"manifest edits module {path!r}, which the model source does not have"
                ) from None
            _apply_patch(target, item["args"])
            continue
        parent_name, _, child = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError:
            raise SourceError(
                f"manifest edits module {path!r}, which the model source does not have"
            ) from None
        if item["class"] == "__deleted__":
            delattr(parent, child)
        else:
            setattr(parent, child, build_module(item))
    return model
