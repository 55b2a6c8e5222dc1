"""Quantization parameters of observer graphs (PT2E and FX): record them, pin them, snap weights.

What makes a stored int8 model reload bit-exact: the scale / zero point of every observer is
recorded after calibration (or QAT), the weights are snapped to their grid, and at load time every
observer of a freshly prepared graph is made to report the recorded values before conversion.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from compress_cli._utils.arrays import pack_array, unpack_array
from compress_cli.errors import SourceError


def observer_nodes(gm: Any) -> list[tuple[str, Any, Any]]:
    """(key, node, observer module) of every observer / fake-quantize in a prepared graph.

    The key is the observer's position plus what it observes (a weight's state key, or the op that
    produced the activation): the same for a PTQ-prepared and a QAT-prepared export of one module,
    whose node *names* differ (move_exported_model_to_eval renames the dropout nodes)."""
    out: list[tuple[str, Any, Any]] = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if not hasattr(mod, "calculate_qparams"):
            continue
        src = node.args[0]
        what = (
            src.target
            if getattr(src, "op", None) in ("get_attr", "placeholder")
            else str(getattr(src, "target", src))
        )
        out.append((f"{len(out):03d} {what}", node, mod))
    return out


def record_qparams(gm: Any) -> dict[str, dict[str, Any]]:
    """Scale / zero point of every observer (after calibration or QAT), keyed by observed edge;
    ``param`` names the weight an observer quantizes (a get_attr target = the module's state key)."""
    out = {}
    for key, node, mod in observer_nodes(gm):
        scale, zp = mod.calculate_qparams()
        src = node.args[0]
        per_channel = mod.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine)
        out[key] = {
            "scale": pack_array(scale.float()),
            "zero_point": pack_array(zp.to(torch.int64)),
            "param": src.target if getattr(src, "op", None) == "get_attr" else None,
            "axis": int(mod.ch_axis) if per_channel else None,
            "quant_min": int(mod.quant_min),
            "quant_max": int(mod.quant_max),
        }
    return out


def pin_qparams(pm: Any, qparams: dict[str, dict[str, Any]]) -> None:
    """Make every observer of a prepared graph report the recorded scale / zero point."""
    obs = observer_nodes(pm)
    have, want = {k for k, _, _ in obs}, set(qparams)
    if have != want:
        missing, extra = sorted(want - have)[:3], sorted(have - want)[:3]
        raise SourceError(
            "the quantized graph of this model differs from the recorded one "
            "(torch/torchao version change?): "
            f"recorded but absent {missing}, present but not recorded {extra}"
        )
    for key, _, mod in obs:
        p = qparams[key]
        scale = torch.from_numpy(unpack_array(p["scale"]))
        zp = torch.from_numpy(unpack_array(p["zero_point"]))
        mod.calculate_qparams = functools.partial(_fixed_qparams, scale, zp)
        if hasattr(mod, "min_val"):  # convert warns on observers that never saw data; they need none
            mod.min_val = torch.tensor(0.0) if mod.min_val.dim() == 0 else torch.zeros_like(scale)
            mod.max_val = torch.tensor(1.0) if mod.max_val.dim() == 0 else torch.ones_like(scale)


def _fixed_qparams(scale: torch.Tensor, zp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return scale, zp


def snap_(t: torch.Tensor, scale: Any, zero_point: Any, axis: int | None, qmin: int, qmax: int) -> None:
    """Replace ``t`` in place by its values on the integer grid (fake quantization)."""
    s = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
    z = torch.as_tensor(zero_point).reshape(-1)
    with torch.no_grad():
        if axis is None:
            q = torch.fake_quantize_per_tensor_affine(t.data.float(), float(s[0]), int(z[0]), qmin, qmax)
        else:
            q = torch.fake_quantize_per_channel_affine(t.data.float(), s, z.to(torch.int32), axis, qmin, qmax)
        t.data.copy_(q.to(t.dtype) + 0.0)  # + 0.0 turns -0.0 into 0.0 (codes * scale gives no -0.0)
