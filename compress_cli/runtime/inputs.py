"""What a model is called with, recorded from a real example: the *input spec*.

A model rebuilt or exported away from its data (``compress_cli.load()`` replaying a quantization,
an ONNX export, ONNX Runtime's quantizer) needs example inputs of the right structure, names and
dtypes; a single ``input_shape`` says that only for one float tensor. :class:`InputSpec` says it for
any input structure (:mod:`compress_cli._utils.batches`): a tensor (one positional argument, named
``input`` in ONNX), a tuple (positional arguments ``input_0``, ``input_1``, ...) or a dict (keyword
arguments, named by their keys in ``forward``'s order). Per tensor: dtype, one sample's shape, and
the axes that vary: the batch always, the sequence length of token inputs (2-D integer tensors such
as ``input_ids`` and ``attention_mask``). It is plain JSON in manifests (``to_json`` /
``from_json``, which checks untrusted data) and torch-free at import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from compress_cli.errors import SourceError, StageError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

#: the name of a model's single tensor input in every ONNX file this package writes
ONNX_INPUT = "input"
#: names of the dynamic axes (ONNX ``dim_param``): the batch, and the sequence of token inputs
BATCH, SEQUENCE = "batch", "sequence"
#: dtypes an input spec may name (torch names without ``torch.``)
DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
#: bounds on untrusted specs: tensors, rank of a sample, a size, a name's length
MAX_TENSORS, MAX_RANK, MAX_SIZE, MAX_NAME = 64, 8, 2**31 - 1, 200

Kind = Literal["tensor", "args", "kwargs"]


@dataclass(frozen=True)
class TensorSpec:
    """One input tensor: its ONNX/keyword ``name``, ``dtype``, one sample's ``shape`` (no batch
    dimension) and the ``dynamic`` axes of the batched tensor (0: batch; 1: sequence)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    dynamic: tuple[int, ...] = (0,)

    @property
    def is_token(self) -> bool:
        """Whether it has a dynamic sequence axis (a 2-D integer tensor: ids, masks)."""
        return 1 in self.dynamic

    def axis_names(self) -> dict[int, str]:
        """Its dynamic axes by name: ``{0: "batch"}`` or ``{0: "batch", 1: "sequence"}``."""
        return {a: (BATCH if a == 0 else SEQUENCE) for a in self.dynamic}

    def to_json(self) -> dict[str, Any]:
        """Plain JSON."""
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "dynamic": list(self.dynamic),
        }


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _tensor_spec(name: str, t: Any) -> TensorSpec:
    import torch

    if not isinstance(t, torch.Tensor):
        raise StageError(
            f"model input {name!r} is a {type(t).__name__}, not a tensor: only tensors can be exported or "
            "replayed; set task.inputs to the batch keys that hold tensors"
        )
    if t.dim() == 0:
        raise StageError(f"model input {name!r} is a scalar: inputs need a batch dimension")
    dtype = _dtype_name(t)
    if dtype not in DTYPES:
        raise StageError(f"model input {name!r} has dtype {dtype}, which cannot be exported")
    token = t.dim() == 2 and not t.is_floating_point() and t.dtype != torch.bool
    return TensorSpec(name, dtype, tuple(int(d) for d in t.shape[1:]), (0, 1) if token else (0,))


@dataclass(frozen=True)
class InputSpec:
    """How a model is called: ``kind`` (``tensor``: ``model(x)``; ``args``: ``model(*xs)``;
    ``kwargs``: ``model(**d)``) and its ``tensors`` in call order."""

    kind: Kind
    tensors: tuple[TensorSpec, ...]

    # ------------------------------------------------------------------ building
    @classmethod
    def from_example(cls, inputs: Any, model: nn.Module | None = None) -> InputSpec:
        """The spec of a real example (a tensor, tuple/list or dict of tensors). With ``model``,
        dict keys are put in the order of its ``forward`` parameters (exporters name inputs in
        that order)."""
        if isinstance(inputs, Mapping):
            keys = order_keys(list(inputs), model)
            return cls("kwargs", tuple(_tensor_spec(str(k), inputs[k]) for k in keys))
        if isinstance(inputs, (tuple, list)):
            if not inputs:
                raise StageError("the model takes no inputs: nothing to export or replay")
            return cls("args", tuple(_tensor_spec(f"{ONNX_INPUT}_{i}", t) for i, t in enumerate(inputs)))
        return cls("tensor", (_tensor_spec(ONNX_INPUT, inputs),))

    @classmethod
    def from_shape(cls, shape: Sequence[int]) -> InputSpec:
        """One float32 tensor of sample shape ``shape`` (what ``input_shape`` said)."""
        return cls("tensor", (TensorSpec(ONNX_INPUT, "float32", tuple(int(d) for d in shape)),))

    @classmethod
    def coerce(cls, spec: InputSpec | Sequence[int]) -> InputSpec:
        """``spec`` itself, or the spec of one float tensor of that sample shape."""
        return spec if isinstance(spec, InputSpec) else cls.from_shape(spec)

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> InputSpec:
        """The spec a manifest entry records: ``input_spec``, or (older manifests) ``input_shape``."""
        if "input_spec" in entry:
            return cls.from_json(entry["input_spec"])
        shape = entry.get("input_shape")
        if not isinstance(shape, list) or not all(type(d) is int and 0 < d <= MAX_SIZE for d in shape):
            raise SourceError(
                f"transform entry has neither input_spec nor a valid input_shape (got {shape!r:.60})"
            )
        return cls.from_shape(shape)

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> dict[str, Any]:
        """Plain JSON (what manifests and ONNX metadata hold)."""
        return {"kind": self.kind, "tensors": [t.to_json() for t in self.tensors]}

    @classmethod
    def from_json(cls, obj: Any) -> InputSpec:
        """The spec from JSON read from a file: SourceError naming each malformed field."""
        problems = spec_problems(obj)
        if problems:
            raise SourceError([f"input_spec: {p}" for p in problems])
        return cls(
            obj["kind"],
            tuple(
                TensorSpec(t["name"], t["dtype"], tuple(t["shape"]), tuple(t.get("dynamic", [0])))
                for t in obj["tensors"]
            ),
        )

    # ------------------------------------------------------------------ using
    @property
    def names(self) -> list[str]:
        """The input names, in call order (ONNX input names)."""
        return [t.name for t in self.tensors]

    @property
    def sequence_length(self) -> int | None:
        """The sequence length of the recorded example's token inputs (None: none)."""
        return next((t.shape[0] for t in self.tensors if t.is_token), None)

    def example(self, batch: int = 2, seq: int | None = None, rng: np.random.Generator | None = None) -> Any:
        """Inputs of this structure: ``batch`` samples, token inputs ``seq`` long (default: as
        recorded). Float tensors are zeros, or standard normal draws from ``rng``; integer inputs
        are zeros, except masks (a name containing ``mask``) and booleans: ones."""
        import numpy as np
        import torch

        values = []
        for t in self.tensors:
            shape = [batch, *t.shape]
            if seq is not None and t.is_token:
                shape[1] = int(seq)
            dtype = getattr(torch, t.dtype)
            if dtype.is_floating_point and rng is not None:
                values.append(torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(dtype))
            elif dtype == torch.bool or (not dtype.is_floating_point and "mask" in t.name.lower()):
                values.append(torch.ones(shape, dtype=dtype))
            else:
                values.append(torch.zeros(shape, dtype=dtype))
        return self.structure(values)

    def structure(self, values: Sequence[Any]) -> Any:
        """``values`` (one per tensor, in order) in this spec's structure."""
        if self.kind == "tensor":
            return values[0]
        if self.kind == "args":
            return tuple(values)
        return dict(zip(self.names, values, strict=True))

    def flatten(self, inputs: Any) -> list[Any]:
        """The tensors of ``inputs`` (this structure) in this spec's order; StageError naming what
        is missing."""
        if self.kind == "kwargs":
            if not isinstance(inputs, Mapping):
                raise StageError(f"expected keyword inputs {self.names}, got a {type(inputs).__name__}")
            missing = [n for n in self.names if n not in inputs]
            if missing:
                raise StageError(
                    f"inputs lack {', '.join(missing)} (the model takes {', '.join(self.names)})"
                )
            return [inputs[n] for n in self.names]
        if self.kind == "args":
            if not isinstance(inputs, (tuple, list)) or len(inputs) != len(self.tensors):
                raise StageError(
                    f"expected {len(self.tensors)} positional inputs, got {type(inputs).__name__}"
                )
            return list(inputs)
        return [inputs]

    def ordered(self, inputs: Any) -> Any:
        """``inputs`` with dict keys in this spec's order (exporters name inputs by position)."""
        return self.structure(self.flatten(inputs)) if self.kind == "kwargs" else inputs

    def arrays(self, inputs: Any) -> dict[str, np.ndarray]:
        """ONNX Runtime feeds: each input as a CPU numpy array of its recorded dtype, by name."""
        out = {}
        for t, v in zip(self.tensors, self.flatten(inputs), strict=True):
            v = v.detach().cpu()
            if _dtype_name(v) != t.dtype:
                import torch

                v = v.to(getattr(torch, t.dtype))
            out[t.name] = v.contiguous().numpy()
        return out

    def args_kwargs(self, inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any] | None]:
        """``(args, kwargs)`` to call or export the model with (``kwargs`` None for positional)."""
        values = self.flatten(inputs)
        return (
            ((), dict(zip(self.names, values, strict=True)))
            if self.kind == "kwargs"
            else (tuple(values), None)
        )

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """The TorchScript exporter's ``dynamic_axes`` of the inputs, by name."""
        return {t.name: t.axis_names() for t in self.tensors}

    def dynamic_shapes(self, batch_max: int = 4096) -> Any:
        """``torch.export``'s ``dynamic_shapes`` for this structure: one ``batch`` dimension shared by
        every input; the sequence axis of token inputs left for the exporter to infer (its range
        is often bounded by the model, e.g. by its position embeddings)."""
        import torch

        batch = torch.export.Dim(BATCH, min=1, max=batch_max)
        axes = [{a: (batch if a == 0 else torch.export.Dim.DYNAMIC) for a in t.dynamic} for t in self.tensors]
        if self.kind == "kwargs":
            return dict(zip(self.names, axes, strict=True))
        return tuple(axes)

    def with_length(self, inputs: Any, seq: int) -> Any:
        """``inputs`` with every token input cut (or padded: ids with 0, masks with 0) to ``seq``."""
        import torch

        values = []
        for t, v in zip(self.tensors, self.flatten(inputs), strict=True):
            if t.is_token:
                n = v.shape[1]
                v = v[:, :seq] if seq <= n else torch.cat([v, v.new_zeros(v.shape[0], seq - n)], 1)
            values.append(v)
        return self.structure(values)

    def describe(self) -> dict[str, Any]:
        """For reports: each input's dtype and shape with its dynamic axes named."""
        out = {}
        for t in self.tensors:
            dims: list[int | str] = [BATCH, *t.shape]
            for a, n in t.axis_names().items():
                dims[a] = n
            out[t.name] = {"dtype": t.dtype, "shape": dims}
        return out


def order_keys(keys: list[Any], model: nn.Module | None) -> list[Any]:
    """``keys`` in the order of ``model.forward``'s parameters (those it does not name last, as given)."""
    if model is None:
        return keys
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return keys
    rank = {p: i for i, p in enumerate(params)}
    return sorted(keys, key=lambda k: rank.get(k, len(rank)))


def spec_problems(obj: Any) -> list[str]:
    """What is wrong with an input spec read from JSON (empty: well formed)."""
    if not isinstance(obj, dict):
        return ["must be a mapping with kind and tensors"]
    problems = []
    kind, tensors = obj.get("kind"), obj.get("tensors")
    if kind not in ("tensor", "args", "kwargs"):
        problems.append(f"kind: must be tensor, args or kwargs (got {kind!r:.40})")
    if not isinstance(tensors, list) or not 1 <= len(tensors) <= MAX_TENSORS:
        return [*problems, f"tensors: must be a list of 1 to {MAX_TENSORS} tensor specs"]
    if kind == "tensor" and len(tensors) != 1:
        problems.append("tensors: kind tensor has exactly one")
    names = set()
    for i, t in enumerate(tensors):
        where = f"tensors[{i}]"
        if not isinstance(t, dict):
            problems.append(f"{where}: must be a mapping")
            continue
        name, shape, dynamic = t.get("name"), t.get("shape"), t.get("dynamic", [0])
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or name in names:
            problems.append(f"{where}.name: must be a unique name of 1 to {MAX_NAME} characters")
        names.add(name)
        if t.get("dtype") not in DTYPES:
            problems.append(f"{where}.dtype: must be one of {', '.join(DTYPES)}")
        if (
            not isinstance(shape, list)
            or len(shape) >= MAX_RANK
            or not all(type(d) is int and 0 < d <= MAX_SIZE for d in shape)
        ):
            problems.append(f"{where}.shape: must be a list of up to {MAX_RANK - 1} positive sizes")
            continue
        if dynamic not in ([0], [0, 1]) or (dynamic == [0, 1] and len(shape) != 1):
            problems.append(f"{where}.dynamic: must be [0] or, for a 2-D token input, [0, 1]")
        extra = sorted(set(t) - {"name", "dtype", "shape", "dynamic"})
        if extra:
            problems.append(f"{where}: unknown keys {extra[:3]}")
    return problems
