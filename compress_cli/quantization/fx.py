"""int8_static's fallback backend: torch.ao's FX graph mode (deprecated upstream), eager int8 kernels.

Used with ``backend: fx``, or where torchao's PT2E flow is missing. Weights are snapped to the
per-channel -127..127 grid that ``convert_fx`` re-derives from them; the activation qparams are
recorded and pinned at load, as for PT2E.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from compress_cli._utils.quiet import quiet
from compress_cli.errors import StageError
from compress_cli.quantization.qparams import pin_qparams, record_qparams, snap_


def fx_available() -> bool:
    """Whether this torch still ships torch.ao's FX quantization."""
    try:
        from torch.ao.quantization import quantize_fx  # noqa: F401
    except ImportError:
        return False
    return True


def fx_qconfig_mapping(reduce_range: bool, exclude: Iterable[str] = ()) -> Any:
    """torch.ao's x86 mapping with activations' reduce_range from the CPU and per-channel weights
    on the symmetric -127..127 range (re-observing weights already on that grid gives them back)."""
    from torch.ao.quantization import (
        HistogramObserver,
        QConfig,
        get_default_qconfig_mapping,
        per_channel_weight_observer_range_neg_127_to_127,
    )

    qc = QConfig(
        activation=HistogramObserver.with_args(reduce_range=reduce_range),
        weight=per_channel_weight_observer_range_neg_127_to_127,
    )
    mapping = get_default_qconfig_mapping("x86").set_global(qc)
    for name in exclude:
        mapping.set_module_name(name, None)
    return mapping


def _fx_prepare(model: nn.Module, inputs: Any, reduce_range: bool, exclude: Iterable[str]) -> Any:
    """``prepare_fx`` with the x86 mapping; ``inputs``: the input spec (or a sample shape)."""
    from torch.ao.quantization.quantize_fx import prepare_fx

    from compress_cli.runtime.inputs import InputSpec

    spec = InputSpec.coerce(inputs)
    if spec.kind == "kwargs":
        raise StageError(
            "backend: fx traces positional inputs only and this model takes keyword inputs; "
            "use backend: pt2e, or scheme onnxruntime_int8 / int8_dynamic"
        )
    example = spec.example(2)
    try:
        with quiet():
            return prepare_fx(
                copy.deepcopy(model).eval(),
                fx_qconfig_mapping(reduce_range, exclude),
                example if isinstance(example, tuple) else (example,),
            )
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise StageError(f"torch.ao FX cannot trace the model ({type(e).__name__}: {first})") from None


def fx_calibrate(
    model: nn.Module, batches: list[torch.Tensor], reduce_range: bool, exclude: Iterable[str] = ()
) -> dict[str, dict[str, Any]]:
    """torch.ao FX: ``prepare_fx`` (x86 mapping), run the calibration batches; -> activation qparams."""
    from compress_cli._utils.batches import call
    from compress_cli.runtime.inputs import InputSpec

    pm = _fx_prepare(model, InputSpec.from_example(batches[0], model), reduce_range, exclude)
    with torch.no_grad(), quiet():
        for x in batches:
            call(pm, x)
    return record_qparams(pm)


def snap_fx_weights_(model: nn.Module, exclude: Iterable[str] = ()) -> int:
    """Snap every Conv/Linear weight to its per-channel -127..127 grid (what convert_fx will use)."""
    from torch.ao.quantization import per_channel_weight_observer_range_neg_127_to_127

    skip = set(exclude)
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and name not in skip:
            obs = per_channel_weight_observer_range_neg_127_to_127()
            obs(m.weight.detach())
            scale, zp = obs.calculate_qparams()
            snap_(m.weight, scale, zp, obs.ch_axis, obs.quant_min, obs.quant_max)
            n += 1
    return n


def build_fx(
    model: nn.Module,
    qparams: dict[str, dict[str, Any]],
    reduce_range: bool,
    exclude: Iterable[str],
    inputs: Any,
) -> nn.Module:
    """torch.ao FX ``convert_fx`` of ``model`` (weights on the grid) with the recorded activation
    qparams pinned: an eager module of quantized kernels (x86 backend)."""
    from torch.ao.quantization.quantize_fx import convert_fx

    pm = _fx_prepare(model, inputs, reduce_range, exclude)
    pin_qparams(pm, qparams)
    with quiet():
        return convert_fx(pm)
