"""int8_dynamic: torch.ao dynamic quantization (int8 Linear/LSTM weights, activations at run time).

The stored module holds the int8 weights as float32 values (``(q - zero_point) * scale``); load()
re-quantizes them with the same symmetric -127..127 observers, which gives back the same integers.
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


@register_scheme("int8_dynamic")
class DynamicInt8(Int8Handler):
    """Linear/LSTM weights to int8 (no calibration); the result runs in eager on CPU."""

    def snap(self, model: nn.Module, job: Int8Job) -> nn.Module:
        """Quantize a copy dynamically and write its int8 weights back as float32 values."""
        layers = snap_dynamic_weights_(model, dynamic_quantize(model, job.exclude))
        if not layers:
            raise StageError(
                "int8_dynamic found no Linear/LSTM layer to quantize "
                "(convolutions need int8_static or onnxruntime_int8)"
            )
        job.details["layers"] = layers
        return model

    def build_runtime(self, model: nn.Module, entry: dict[str, Any], device: Any = None) -> nn.Module:
        """``quantize_dynamic`` of the stored module (gives back the same integers)."""
        return dynamic_quantize(model, entry.get("exclude", []))

    def export_model(self, fmt: str, state: Any, entry: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """torchscript: the torch.ao int8 module the runner measured."""
        return (state.runner.model if fmt == "torchscript" else None), {}
