"""int8_dynamic: torch.ao dynamic quantization (int8 Linear/LSTM weights, activations at run time)
and int8 embedding tables (weight-only, one float32 scale per row: :class:`QuantizedEmbedding`).

The stored module holds the int8 weights as float32 values (``(q - zero_point) * scale``); load()
re-quantizes them with the same symmetric -127..127 observers, which gives back the same integers
(the checkpoint stores such rows as int8 codes plus a scale per row: 1 byte per weight).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from compress_cli._utils.quiet import quiet
from compress_cli.errors import StageError
from compress_cli.quantization.base import Int8Handler, Int8Job
from compress_cli.quantization.schemes import register_scheme


def dynamic_qconfig_spec(exclude: Iterable[str] = ()) -> dict[Any, Any]:
    """Linear: per-channel int8 weights; LSTM: per-tensor. Weight range -127..127 (symmetric), so
    re-quantizing weights already on the grid gives back the same integers (exact reload)."""
    from torch.ao.quantization import (
        QConfig,
        default_dynamic_quant_observer,
        per_channel_weight_observer_range_neg_127_to_127,
        weight_observer_range_neg_127_to_127,
    )

    spec: dict[Any, Any] = {
        nn.Linear: QConfig(
            activation=default_dynamic_quant_observer, weight=per_channel_weight_observer_range_neg_127_to_127
        ),
        nn.LSTM: QConfig(
            activation=default_dynamic_quant_observer, weight=weight_observer_range_neg_127_to_127
        ),
    }
    for name in exclude:
        spec[name] = None
    return spec


def dynamic_quantize(model: nn.Module, exclude: Iterable[str] = ()) -> nn.Module:
    """``torch.ao.quantization.quantize_dynamic`` on a copy (CPU): int8 weights, activations
    quantized at run time."""
    from torch.ao.quantization import quantize_dynamic

    with quiet():
        return quantize_dynamic(
            copy.deepcopy(model).cpu().eval(), dynamic_qconfig_spec(exclude), dtype=torch.qint8
        )


def set_activation_range_(model: nn.Module, reduce_range: bool) -> nn.Module:
    """Whether ``model``'s dynamic int8 Linear layers quantize activations to 7 bits.

    torch's ``DynamicQuantizedLinear`` (module version 4) always calls its kernel with
    ``reduce_range=True``, which only CPUs without VNNI need (see ``cpu.choose_reduce_range``) and
    which costs about 6 dB of output SQNR (MiniLM: 12.8 dB; cosine 0.974 instead of 0.993). A
    version-3 module calls the same kernel with its default, full 8-bit activations; the weights
    and packed parameters are the same."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    for m in model.modules():
        if isinstance(m, DynamicLinear) and m._packed_params.dtype == torch.qint8:
            m.version = 4 if reduce_range else 3
    return model


def no_dynamic_layers() -> str:
    """Why int8_dynamic cannot apply to a model, and what to use instead."""
    return (
        "int8_dynamic found no Linear, LSTM or Embedding layer to quantize (convolutions need "
        "scheme int8_static or onnxruntime_int8; check the stage's exclude globs)"
    )


def dequantize32(qt: torch.Tensor) -> torch.Tensor:
    """A quantized tensor's values as float32 ``(q - zero_point) * float32(scale)``, no -0.0 (the
    checkpoint then finds each row's int8 grid and stores it at 8 bits per value)."""
    if qt.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        shape = [1] * qt.dim()
        shape[qt.q_per_channel_axis()] = -1
        s = qt.q_per_channel_scales().float().reshape(shape)
        z = qt.q_per_channel_zero_points().float().reshape(shape)
    else:
        s = torch.tensor(qt.q_scale(), dtype=torch.float32)
        z = torch.tensor(float(qt.q_zero_point()))
    return (qt.int_repr().float() - z) * s + 0.0


def snap_dynamic_weights_(model: nn.Module, qmodel: nn.Module) -> list[str]:
    """Write the int8 weights of ``qmodel`` (as float32 values) into ``model``; -> the layer names."""
    from torch.ao.nn.quantized import dynamic as nnqd

    from compress_cli._utils.modules import tensor_attr

    done = []
    with torch.no_grad():
        for name, qm in qmodel.named_modules():
            if isinstance(qm, nnqd.Linear):
                tensor_attr(model.get_submodule(name)).copy_(dequantize32(qm.weight()))
                done.append(name)
            elif isinstance(qm, nnqd.LSTM):
                target = model.get_submodule(name)
                for wname, w in qm._weight_bias()["weight"].items():
                    getattr(target, wname).copy_(dequantize32(w))
                done.append(name)
    return done


class QuantizedEmbedding(nn.Module):
    """An ``nn.Embedding`` with int8 rows: ``qweight`` (int8 codes, -127..127) and ``scale`` (one
    float32 per row); a lookup returns ``qweight[ids] * scale[ids]`` in float32 (the values the
    stored, snapped table holds). 4x smaller than the fp32 table; inference only."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.padding_idx = padding_idx
        self.register_buffer("qweight", qweight.to(torch.int8))
        self.register_buffer("scale", scale.float().reshape(-1, 1))

    @classmethod
    def from_float(cls, emb: nn.Embedding) -> QuantizedEmbedding:
        """Quantize ``emb``'s table row by row (symmetric, max |row| -> 127); a table already on
        that grid (snapped) gives back the same codes."""
        w = emb.weight.detach().float().cpu()
        scale = row_scales(w)
        q = torch.round(w / scale[:, None]).clamp_(-127, 127)
        return cls(q.to(torch.int8), scale, emb.padding_idx)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """The float32 rows of ``ids``."""
        qweight, scale = self.get_buffer("qweight"), self.get_buffer("scale")
        return nn.functional.embedding(ids, qweight).float() * nn.functional.embedding(ids, scale)

    def extra_repr(self) -> str:
        """The table's size, as nn.Embedding prints it."""
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"


def row_scales(w: torch.Tensor) -> torch.Tensor:
    """Per-row symmetric int8 scales of a 2-D float tensor: max |row| / 127 (1 for an all-zero row)."""
    scale = w.abs().amax(dim=1) / 127
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def embeddings(model: nn.Module, exclude: Iterable[str] = ()) -> list[str]:
    """The ``nn.Embedding`` tables int8_dynamic quantizes: every one not excluded, in float, without
    ``max_norm`` (that renormalizes the table in place at lookup) and not sparse."""
    skip = set(exclude)
    return [
        name
        for name, m in model.named_modules()
        if type(m) is nn.Embedding
        and name not in skip
        and m.max_norm is None
        and not m.sparse
        and m.weight.is_floating_point()
    ]


def snap_embeddings_(model: nn.Module, names: Iterable[str]) -> None:
    """Put each named table of ``model`` on its per-row int8 grid (float32 values ``q * scale``)."""
    with torch.no_grad():
        for name in names:
            emb = model.get_submodule(name)
            assert isinstance(emb, nn.Embedding)
            q = QuantizedEmbedding.from_float(emb)
            emb.weight.copy_(q.get_buffer("qweight").float() * q.get_buffer("scale") + 0.0)


def quantize_embeddings_(model: nn.Module, names: Iterable[str]) -> nn.Module:
    """Replace each named ``nn.Embedding`` of ``model`` by its :class:`QuantizedEmbedding`."""
    from compress_cli._utils.modules import set_submodule

    for name in names:
        set_submodule(model, name, QuantizedEmbedding.from_float(model.get_submodule(name)))  # type: ignore[arg-type]
    return model


@register_scheme("int8_dynamic")
class DynamicInt8(Int8Handler):
    """Linear/LSTM weights to int8 (no calibration), embedding tables to int8 rows; the result runs
    in eager on CPU."""

    def snap(self, model: nn.Module, job: Int8Job) -> nn.Module:
        """Quantize a copy dynamically and write its int8 weights back as float32 values; snap the
        embedding tables to their per-row int8 grid."""
        tables = embeddings(model, job.exclude)
        layers = snap_dynamic_weights_(model, dynamic_quantize(model, job.exclude))
        snap_embeddings_(model, tables)
        if not layers and not tables:
            raise StageError(no_dynamic_layers())
        job.details["layers"] = layers
        job.entry["reduce_range"] = job.reduce_range
        if tables:
            job.details["embeddings"] = tables
            job.entry["embeddings"] = tables
        return model

    def build_runtime(self, model: nn.Module, entry: dict[str, Any], device: Any = None) -> nn.Module:
        """``quantize_dynamic`` of the stored module (gives back the same integers), its recorded
        embedding tables as :class:`QuantizedEmbedding`."""
        runtime = dynamic_quantize(model, entry.get("exclude", []))
        set_activation_range_(runtime, entry.get("reduce_range", True))  # older entries: torch's 7 bits
        return quantize_embeddings_(runtime, entry.get("embeddings", []))

    def way_out(self, options: Any) -> str:
        """Keep the failing layer in float, or another scheme."""
        return "keep the layer involved in float (exclude: [module globs]) or use scheme onnxruntime_int8"

    def export_model(self, fmt: str, state: Any, entry: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """torchscript: the torch.ao int8 module the runner measured."""
        return (state.runner.model if fmt == "torchscript" else None), {}
