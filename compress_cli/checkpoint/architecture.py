"""The architecture diff: how a compressed model differs structurally from its model source.

Every module whose class or constructor arguments differ from the freshly built source model
(channels removed, blocks replaced by Identity or by their shortcut path, ...) is recorded at save
time as a spec (``{"path", "class", "args"}``) and rebuilt at load time: one mechanism for every
structural stage, no per-stage code. One generic rule describes a module: the arguments of its
constructor's signature, read back from the same-named attributes, checked at save time by
rebuilding it (the rebuilt module must have the same printout, attributes and tensor shapes).
Plain containers (Sequential, ModuleList, ModuleDict) are described by their children. A manifest
may name the classes of ``torch.nn``, torchvision, ``timm.layers`` and transformers, and of the
model source's own package, which the loader builds only when it trusts that source: loading a
shared model directory never runs code the user did not allow. Other module kinds can be taught
with ``register_module_spec``. torch is imported inside the functions that need it, so the package
(and the stages that register with it) imports fast.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from compress_cli.errors import SourceError

if TYPE_CHECKING:
    from torch import nn

#: packages whose module classes a manifest may name: their layers are built from plain
#: constructor arguments, and importing them runs no code the user did not install as a library
#: (transformers' and torchvision's layer packages only: not their downloading or file parts).
#: A model directory may also name classes of its model source's own package once that source is
#: trusted (the loader refuses an untrusted ``package.module:callable`` before anything is built).
STANDARD_PACKAGES = (
    "torch.nn",
    "torchvision.ops",
    "torchvision.models",
    "timm.layers",
    "transformers.activations",
    "transformers.pytorch_utils",
    "transformers.models",
)
#: containers described by their children instead of constructor arguments
CONTAINERS = ("Sequential", "ModuleList", "ModuleDict")
#: constructor arguments never recorded nor accepted: where and how the loader allocates is its own
_LOADER_ARGS = frozenset({"device", "dtype"})
#: modules with more parameters than this are only rebuilt on the meta device to check a description
_CPU_CHECK_MAX = 1 << 20
#: constructor arguments a layer keeps under another name: class name -> argument -> reader
_READERS: dict[str, dict[str, Callable[[Any], Any]]] = {
    "MultiheadAttention": {
        "bias": lambda m: m.in_proj_bias is not None,
        "add_bias_kv": lambda m: m.bias_k is not None,
    },
}


def _pass_through(_args: dict[str, Any]) -> Any:
    from compress_cli.checkpoint.modules import PassThrough

    return PassThrough()


#: extra module kinds: class name -> (describe(module) -> args, build(args) -> module); the
#: compressor's own bypass (``checkpoint/modules.py``) is one, so every manifest may name it
_EXTRA_SPECS: dict[str, tuple[Callable[[Any], dict[str, Any]], Callable[[dict[str, Any]], Any]]] = {
    "PassThrough": (lambda _m: {}, _pass_through),
}


def register_module_spec(
    class_name: str, describe: Callable[[Any], dict[str, Any]], build: Callable[[dict[str, Any]], Any]
) -> None:
    """Teach the architecture diff a module kind its generic rule cannot describe (constructor
    arguments not kept as attributes, or a class outside the packages a manifest may name):
    ``describe(module)`` -> its constructor arguments (JSON values), ``build(args)`` -> a new one.
    ``build`` must also work under ``torch.device("meta")``: loading checks the tensors of a
    rebuilt module against the stored weights before it allocates them."""
    _EXTRA_SPECS[class_name] = (describe, build)


def source_package(source: str | None) -> str | None:
    """The top-level package of a ``package.module:callable`` model source (None for a built-in
    source): the one package besides ``STANDARD_PACKAGES`` whose classes a manifest may name, and
    only where the loader trusts that source (it refuses an untrusted one before building).
    ``timm:NAME`` gives ``timm.models``: building the source imports that package already, so its
    blocks (``timm.models.efficientnet:...``) add no code the model source did not run."""
    if not source:
        return None
    mod, sep, attr = source.partition(":")
    if mod == "timm" and sep:
        return "timm.models"
    if not sep or mod in ("zoo", "torchvision", "hf") or not attr.isidentifier():
        return None
    parts = mod.split(".")
    return parts[0] if all(p.isidentifier() for p in parts) else None


def _in_package(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _packages(trusted: str | None) -> tuple[str, ...]:
    return STANDARD_PACKAGES + ((trusted,) if trusted else ())


def class_key(cls: type) -> str:
    """How a manifest names a module class: ``Conv2d`` for the layers ``torch.nn`` exports, else
    ``module:qualname`` (``timm.layers.pool2d_same:AvgPool2dSame``)."""
    from torch import nn

    if getattr(nn, cls.__name__, None) is cls:
        return cls.__name__
    return f"{cls.__module__}:{cls.__qualname__}"


def _class_problem(name: str, trusted: str | None) -> str | None:
    """Why a manifest may not name module class ``name`` (None: it may), without importing it."""
    if ":" not in name:
        if name.isidentifier() and not name.startswith("_"):
            return None
        return f"module class {name!r} is not one this version can rebuild"
    module, _, qual = name.partition(":")
    # a class's module may be private (timm.models._efficientnet_blocks), the class may not; no
    # dunder anywhere
    ok_module = all(p.isidentifier() and not p.startswith("__") for p in module.split("."))
    if not ok_module or not all(p.isidentifier() and not p.startswith("_") for p in qual.split(".")):
        return f"module class {name!r} is not one this version can rebuild"
    if not _in_package(module, _packages(trusted)):
        allowed = ", ".join(_packages(trusted))
        return (
            f"module class {name!r} is from package {module.split('.')[0]!r}; a manifest may name "
            f"classes of {allowed} (and of a trusted model source's own package) only"
        )
    return None


def resolve_class(name: str, trusted: str | None = None) -> type[nn.Module]:
    """The module class a manifest names (``class_key``); SourceError for a class outside the
    allowed packages (checked before anything is imported) or not an ``nn.Module``."""
    import importlib

    from torch import nn

    problem = _class_problem(name, trusted)
    if problem:
        raise SourceError(problem)
    if ":" not in name:
        cls = getattr(nn, name, None)
    else:
        module, _, qual = name.partition(":")
        try:
            cls = importlib.import_module(module)
        except ImportError as e:
            raise SourceError(f"module class {name!r}: cannot import {module!r} ({e})") from None
        for part in qual.split("."):
            cls = getattr(cls, part, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise SourceError(f"module class {name!r} is not one this version can rebuild")
    return cls


_MISSING = object()


def _read_arg(m: nn.Module, name: str) -> Any:
    """The value module ``m`` keeps for its constructor argument ``name`` (``_MISSING`` if none):
    a same-named attribute; ``bias`` -> whether it has a bias tensor."""
    import torch

    reader = _READERS.get(type(m).__name__, {}).get(name)
    if reader is not None and type(m).__module__.startswith("torch.nn"):
        return reader(m)
    if name in m._parameters or name in m._buffers:
        t = m._parameters.get(name, m._buffers.get(name))
        return t is not None if name == "bias" else t
    if name in m._modules:
        return m._modules[name]
    if name in vars(m):
        return vars(m)[name]
    if isinstance(getattr(type(m), name, None), property):
        try:
            return getattr(m, name)
        except Exception:
            return _MISSING
    if name == "bias" and isinstance(getattr(m, "bias", None), torch.Tensor):
        return True
    return _MISSING


def _jsonable(v: Any) -> Any:
    """``v`` as the manifest stores it (tuples as lists), or ``_MISSING`` when it is not a plain
    value a manifest may hold (see ``_plain_problems``)."""
    if isinstance(v, tuple | list):
        v = list(v)
    if type(v) not in (bool, int, float, str, type(None), list) or _plain_problems(v):
        return _MISSING
    return v


#: classes whose constructor hides its arguments behind ``*args, **kwargs``: the base whose
#: signature they pass them to, and the arguments the class fixes itself
_SIGNATURE_OF: dict[str, tuple[str, frozenset[str]]] = {
    "RNN": ("RNNBase", frozenset({"mode"})),
    "LSTM": ("RNNBase", frozenset({"mode"})),
    "GRU": ("RNNBase", frozenset({"mode"})),
}


def _same_plain(a: Any, b: Any) -> bool:
    """Whether two values are the same plain value, types included (``1`` is not ``1.0`` nor ``True``)."""
    import json

    x, y = _jsonable(a), _jsonable(b)
    return x is not _MISSING and y is not _MISSING and json.dumps(x) == json.dumps(y)


def _signature(cls: type) -> list[Any]:
    """The parameters of ``cls``'s constructor, without ``self``."""
    import inspect

    owner, fixed = cls, frozenset[str]()
    if cls.__name__ in _SIGNATURE_OF and cls.__module__.startswith("torch.nn"):
        base_name, fixed = _SIGNATURE_OF[cls.__name__]
        owner = next(c for c in cls.__mro__ if c.__name__ == base_name)
    return [p for p in inspect.signature(owner).parameters.values() if p.name not in fixed]


def ctor_args(m: nn.Module) -> tuple[dict[str, Any] | None, str]:
    """``(args, "")``: the constructor arguments module ``m`` keeps (generic rule: every argument
    of its constructor's signature, read back from the same-named attribute; a missing one keeps its
    default), as JSON values, those at their default left out; ``(None, why)`` when one cannot be
    read back. Not yet checked by rebuilding (``describe`` does that)."""
    import inspect

    try:
        params = _signature(type(m))
    except (TypeError, ValueError):
        return None, "its constructor has no readable signature"
    args: dict[str, Any] = {}
    for p in params:
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        has_default = p.default is not inspect.Parameter.empty
        if p.name in _LOADER_ARGS or (p.name.startswith("_") and has_default):
            continue
        value = _MISSING if p.name.startswith("_") else _read_arg(m, p.name)
        if value is _MISSING:
            if has_default:
                continue
            return None, f"its constructor argument {p.name!r} is not kept as an attribute"
        if has_default and (value is p.default or _same_plain(value, p.default)):
            continue  # the default (not recorded: some constructors refuse an argument given at all)
        plain = _jsonable(value)
        if plain is _MISSING:
            return None, f"its constructor argument {p.name!r} is a {type(value).__name__}, not a plain value"
        args[p.name] = plain
    return args, ""


def _tensor_shapes(m: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every parameter's and buffer's shape, with torch.nn.utils.prune's ``X_orig``/``X_mask``
    pairs named ``X`` (how the saved weights name them)."""
    shapes = {k: tuple(v.shape) for k, v in [*m.named_parameters(), *m.named_buffers()]}
    for k in [k for k in shapes if k.endswith("_mask") and k[: -len("_mask")] + "_orig" in shapes]:
        del shapes[k]
        shapes[k[: -len("_mask")]] = shapes.pop(k[: -len("_mask")] + "_orig")
    return shapes


def _same_structure(a: nn.Module, b: nn.Module) -> bool:
    """Whether ``b`` (rebuilt) is ``a``'s architecture: the same classes, printout, plain attributes
    and tensor shapes at every submodule."""
    mods_a, mods_b = list(a.named_modules()), list(b.named_modules())
    return (
        [(n, type(m)) for n, m in mods_a] == [(n, type(m)) for n, m in mods_b]
        and [_patchable_attrs(m) for _, m in mods_a] == [_patchable_attrs(m) for _, m in mods_b]
        and _tensor_shapes(a) == _tensor_shapes(b)
        and repr(a) == repr(b)
    )


def describe(m: nn.Module, trusted: str | None = None) -> tuple[dict[str, Any] | None, str]:
    """``(spec, "")`` for a module the manifest can rebuild: ``{"class", "args"}`` from its
    constructor arguments (checked by rebuilding it, which must give the same architecture), or a
    plain container's ``{"class", "args": {}, "children": [...]}``; else ``(None, why)``, where a
    container's reason names the first submodule that is not describable. ``trusted``: the model
    source's package (``source_package``), whose classes are allowed besides the standard ones."""
    spec, why, sub, offender = _describe(m, trusted)
    if spec is None and sub:
        why = f"its submodule {sub!r} ({class_key(type(offender))}): {why}"
    return spec, why


def _describe(m: nn.Module, trusted: str | None) -> tuple[dict[str, Any] | None, str, str, nn.Module]:
    """``describe``, with the innermost module that is not describable and its path inside ``m``."""
    import torch
    from torch import nn
    from torch.nn.parameter import UninitializedParameter

    cls = type(m)
    name = cls.__name__
    if name in _EXTRA_SPECS:
        return {"class": name, "args": _EXTRA_SPECS[name][0](m)}, "", "", m
    if cls in (nn.Sequential, nn.ModuleList, nn.ModuleDict):
        children = []
        for child_name, child in m.named_children():
            spec, why, sub, offender = _describe(child, trusted)
            if spec is None:
                return None, why, f"{child_name}.{sub}" if sub else child_name, offender
            children.append({"name": child_name, **spec})
        return {"class": name, "args": {}, "children": children}, "", "", m
    key = class_key(cls)
    if not _in_package(cls.__module__, _packages(trusted)):
        return (
            None,
            (
                f"its class is from package {cls.__module__.split('.')[0]!r}, and a manifest may name the "
                f"classes of {', '.join(STANDARD_PACKAGES)} and of the model source's own package only"
            ),
            "",
            m,
        )
    if any(isinstance(t, UninitializedParameter) for t in [*m.parameters(), *m.buffers()]):
        return None, "it is a lazy module that has not seen an input yet", "", m
    args, why = ctor_args(m)
    if args is None:
        return None, why, "", m
    spec = {"class": key, "args": args}
    small = sum(t.numel() for t in [*m.parameters(), *m.buffers()]) <= _CPU_CHECK_MAX
    for device in ("meta", "cpu") if small else ("meta",):
        try:
            with torch.device(device):
                again = build_module(spec, trusted)
        except Exception:
            continue
        if _same_structure(m, again):
            return spec, "", "", m
        return None, "rebuilt from its constructor arguments it is not the same module", "", m
    return None, "it cannot be rebuilt from its constructor arguments", "", m


def module_spec(m: nn.Module, trusted: str | None = None) -> dict[str, Any] | None:
    """``{"class": ..., "args": {...}}`` (or a container's spec) for a module the manifest can
    rebuild, else None (``describe`` says why)."""
    return describe(m, trusted)[0]


#: what a recipe can do about a module the manifest cannot describe
RECIPE_WAY_OUT = (
    "keep the stage that would change it away from it (drop_layers: list the block in protect; "
    "prune_channels: list the layer in ignore)"
)


def describe_problem(m: nn.Module, path: str = "", source: str | None = None) -> str | None:
    """Why module ``m``, new at ``path`` (a replacement a stage made), cannot be recorded in a
    manifest: one line naming the innermost module that is not describable (path and class), the
    reason and the recipe-level way out; None when it can be. ``source``: the model source the
    manifest names (its own package's classes are allowed). A stage's preflight calls this on the
    modules it would put into the model, before anything runs."""
    spec, why, sub, offender = _describe(m, source_package(source))
    if spec is not None:
        return None
    where = f"{path}.{sub}" if path and sub else path or sub
    inside = f", inside the new {class_key(type(m))} {path!r}," if sub else ""
    out = RECIPE_WAY_OUT
    if why.startswith("its class is from package"):
        out += (
            "; or build the model with a model.source of that package (package.module:callable): the "
            "manifest may name its classes, and loading the directory needs model.trust_source"
        )
    return (
        f"module {where!r} ({class_key(type(offender))}){inside} cannot be described in the manifest: "
        f"{why}; {out} (from Python: compress_cli.checkpoint.register_module_spec)"
    )


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


def build_module(spec: dict[str, Any], trusted: str | None = None) -> nn.Module:
    """A fresh module (random init) from a ``describe`` / manifest entry. ``trusted``: the model
    source's package, whose classes are allowed besides ``STANDARD_PACKAGES``."""
    import inspect

    from torch import nn

    cls_name = spec["class"]
    if cls_name in CONTAINERS and "children" in spec:
        from collections import OrderedDict

        children = [(c["name"], build_module(c, trusted)) for c in spec["children"]]
        if cls_name == "ModuleList":
            return nn.ModuleList(m for _, m in children)
        return getattr(nn, cls_name)(OrderedDict(children))
    if cls_name in _EXTRA_SPECS:
        return _EXTRA_SPECS[cls_name][1](spec["args"])
    cls = resolve_class(cls_name, trusted)
    try:
        params = {
            p.name
            for p in _signature(cls)
            if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        }
    except (TypeError, ValueError):
        params = set()
    bad = [k for k in spec["args"] if k not in params or k in _LOADER_ARGS or k.startswith("_")]
    if bad:
        raise SourceError([f"args.{k}: not an argument of {cls_name}" for k in bad])
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["args"].items()}
    return cls(**args)


def architecture_diff(base: nn.Module, current: nn.Module, source: str | None = None) -> list[dict[str, Any]]:
    """Modules of ``current`` that differ from ``base``, outermost first, as rebuild specs.

    A module whose class changed, or that is new, is rebuilt from its description (``describe``:
    constructor arguments, or a plain container's children). A module of unchanged class whose
    constructor arguments changed is rebuilt from them when they describe it; otherwise, and for
    classes without readable arguments, its changed plain attributes and own tensor shapes are
    patched in place (``__patch__``). ``source``: the model source the manifest names (its own
    package's classes may be named, see ``source_package``). SourceError, naming the module and
    the recipe-level way out, for a new module that cannot be described."""
    trusted = source_package(source)
    base_mods = dict(base.named_modules())
    diff: list[dict[str, Any]] = []
    replaced: list[str] = []
    for name, mod in current.named_modules():
        if any(name.startswith(p + ".") for p in replaced):
            continue
        ref = base_mods.get(name)
        if ref is not None and _same_class(ref, mod):
            if name and type(mod).__name__ not in CONTAINERS and _args_changed(ref, mod, trusted):
                spec = module_spec(mod, trusted)
                if spec is not None:
                    diff.append({"path": name, **spec})
                    replaced.append(name)
                    continue
            patch = patch_spec(ref, mod)
            if patch is not None:
                diff.append({"path": name, **patch})
            continue
        spec = module_spec(mod, trusted)
        if spec is None:
            problem = describe_problem(mod, name, source) or ""
            raise SourceError(
                problem.replace(
                    "cannot be described", "differs from the model source and cannot be described", 1
                )
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


def _same_class(a: nn.Module, b: nn.Module) -> bool:
    """One class, or two of one definition (a factory that defines its class in its body makes a
    new class object per call; the rebuilt base and the model then hold different ones)."""
    ta, tb = type(a), type(b)
    return ta is tb or (ta.__module__, ta.__qualname__) == (tb.__module__, tb.__qualname__)


def _args_changed(ref: nn.Module, mod: nn.Module, trusted: str | None) -> bool:
    """Whether two modules of one class were built with different constructor arguments (as far
    as they can be read back; a registered kind by its own ``describe``)."""
    name = type(mod).__name__
    if name in _EXTRA_SPECS:
        return bool(_EXTRA_SPECS[name][0](ref) != _EXTRA_SPECS[name][0](mod))
    if not _in_package(type(mod).__module__, _packages(trusted)):
        return False
    return ctor_args(ref)[0] != ctor_args(mod)[0]


def _submodule(model: nn.Module, name: str, path: str) -> nn.Module:
    """``model``'s submodule ``name`` ("" is the model), or a SourceError about manifest entry ``path``."""
    try:
        return model.get_submodule(name) if name else model
    except AttributeError:
        raise SourceError(f"manifest edits module {path!r}, which the model source does not have") from None


def apply_architecture_diff(
    model: nn.Module,
    diff: list[dict[str, Any]],
    stored: Mapping[str, Any] | None = None,
    source: str | None = None,
) -> nn.Module:
    """Replay ``architecture_diff`` entries on a freshly built source model (in place; returns it).

    ``stored``: the weights the result will load (name -> tensor). Given, every tensor an entry
    creates must be one of them with the same shape, checked before it is allocated (a rebuilt
    module is first built on the meta device), so a manifest cannot make the loader allocate
    more than the weights file holds. ``source``: the model source the manifest names; classes of
    its own package may be rebuilt (the caller has trusted it by building ``model`` from it).
    """
    trusted = source_package(source)
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
            setattr(parent, child, _checked_build(item, path, stored, trusted))
    return model


def _checked_build(
    item: dict[str, Any], path: str, stored: Mapping[str, Any] | None, trusted: str | None
) -> nn.Module:
    """``build_module(item)``; with ``stored``, only once a meta-device build showed that its
    tensors are the stored ones. Constructor errors (bad arguments) become SourceErrors."""
    import torch

    def build(device: str | None) -> nn.Module:
        try:
            with torch.device(device) if device else contextlib.nullcontext():
                return build_module(item, trusted)
        except SourceError as e:
            raise SourceError(
                [f"manifest architecture entry {path!r} ({item['class']}): {p}" for p in e.problems]
            ) from None
        except (TypeError, ValueError, RuntimeError) as e:
            first = (str(e).splitlines() or [""])[0]
            raise SourceError(
                f"manifest architecture entry {path!r} ({item['class']}): cannot build it "
                f"({type(e).__name__}: {first})"
            ) from None

    if stored is not None:
        for k, t in build("meta").state_dict().items():
            _check_stored(f"{path}.{k}", list(t.shape), stored, False, path)
    return build(None)


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


def architecture_problems(entries: object, source: str | None = None) -> list[str]:
    """What is wrong with a manifest's ``architecture`` list, one located line each: only the
    entry kinds ``architecture_diff`` writes, of module classes a manifest may name (the
    ``STANDARD_PACKAGES``, the package of ``source``, the manifest's model source, and
    ``register_module_spec`` kinds), with plain, bounded constructor arguments. Imports nothing:
    whether a named class exists and takes those arguments is checked when it is built."""
    if not isinstance(entries, list):
        return [f"architecture: must be a list (got {type(entries).__name__})"]
    if len(entries) > MAX_ENTRIES:
        return [f"architecture: {len(entries):,} entries, more than the {MAX_ENTRIES:,} allowed"]
    problems: list[str] = []
    for i, entry in enumerate(entries):
        problems += _entry_problems(entry, f"architecture[{i}]", 0, source_package(source))
    return problems


def _entry_problems(entry: object, where: str, depth: int, trusted: str | None) -> list[str]:
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
    if cls in CONTAINERS and "children" in entry:
        children = entry.get("children")
        if not isinstance(children, list) or len(children) > MAX_ENTRIES or depth >= MAX_DEPTH:
            return [f"{where}.children: must be a list of at most {MAX_ENTRIES:,} modules, {MAX_DEPTH} deep"]
        return [
            p
            for i, c in enumerate(children)
            for p in _entry_problems(c, f"{where}.children[{i}]", depth + 1, trusted)
        ]
    if isinstance(cls, str) and cls in _EXTRA_SPECS:
        return []  # its registered build reads the arguments
    if not isinstance(cls, str) or len(cls) > 1000:
        return [f"{where}.class: module class {cls!r:.60} is not one this version can rebuild"]
    problem = _class_problem(cls, trusted)
    if problem:
        return [f"{where}.class: {problem}"]
    problems = [
        f"{where}.args.{k}: not an argument a manifest may give"
        for k in args
        if not (isinstance(k, str) and k.isidentifier()) or k.startswith("_") or k in _LOADER_ARGS
    ]
    problems += [f"{where}.args.{k}: {p}" for k, v in args.items() for p in _plain_problems(v)]
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
