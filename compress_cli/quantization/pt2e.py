"""int8_static and qat: torchao's PT2E flow (torch.export -> X86InductorQuantizer -> convert_pt2e).

The stored module has batch norm folded and its weights snapped to the per-channel int8 grid; the
entry holds every observer's qparams. :func:`build_pt2e` exports, prepares and pins them, so
load() gets the same :class:`QuantizedGraph`, run through ``torch.compile`` (inductor, freezing)
or, with ``compile: false``, the converted graph in eager (2-3x slower than fp32: for debugging).
int8_static falls back to torch.ao's FX flow (:mod:`compress_cli.quantization.fx`) with
``backend: fx`` or where torchao is missing.
"""

from __future__ import annotations

import types
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compress_cli._utils.arrays import unpack_array
from compress_cli._utils.quiet import quiet
from compress_cli.errors import StageError
from compress_cli.quantization import fx
from compress_cli.quantization.base import Int8Handler, Int8Job
from compress_cli.quantization.qparams import pin_qparams, record_qparams, snap_
from compress_cli.quantization.schemes import register_scheme
from compress_cli.runtime.runners import CompiledRunner, FrozenCompiled, Runner

if TYPE_CHECKING:
    from compress_cli.runtime.inputs import InputSpec
    from compress_cli.state import State

#: how to load the .pt2 the export stage writes of a PT2E int8 graph
PT2E_LOAD = (
    "loading the .pt2 needs torchao's quantized ops registered first: "
    "import torchao.quantization.pt2e  # then torch.export.load(path)"
)


def pt2e_api() -> Any:
    """torchao's PT2E API (or torch.ao's, on older torch) as one namespace."""
    try:
        with quiet():  # torchao's import logs a torch deprecation warning
            from torchao.quantization import pt2e as base
            from torchao.quantization.pt2e import quantize_pt2e as qp
            from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

        return types.SimpleNamespace(
            prepare=qp.prepare_pt2e,
            prepare_qat=qp.prepare_qat_pt2e,
            convert=qp.convert_pt2e,
            xiq=xiq,
            allow_train_eval=base.allow_exported_model_train_eval,
            where="torchao.quantization.pt2e",
        )
    except ImportError:
        pass
    try:  # torch < 2.10 still shipped PT2E in torch.ao
        from torch.ao.quantization import allow_exported_model_train_eval  # type: ignore[attr-defined]
        from torch.ao.quantization import quantize_pt2e as qp  # type: ignore[attr-defined]
        from torch.ao.quantization.quantizer import (  # type: ignore[attr-defined]
            x86_inductor_quantizer as xiq,
        )

        return types.SimpleNamespace(
            prepare=qp.prepare_pt2e,
            prepare_qat=qp.prepare_qat_pt2e,
            convert=qp.convert_pt2e,
            xiq=xiq,
            allow_train_eval=allow_exported_model_train_eval,
            where="torch.ao.quantization.quantize_pt2e",
        )
    except ImportError:
        raise StageError(
            "int8_static/qat need the PT2E quantization flow, which moved to torchao: "
            "pip install 'torchao>=0.12'"
        ) from None


def export_graph(model: nn.Module, example: Any) -> Any:
    """``torch.export.export(strict=True)`` with a dynamic batch dimension (and sequence, for token
    inputs) -> GraphModule. ``example``: the model's inputs (tensor, tuple, or dict: keywords).

    strict: the default non-strict export makes ``prepare_pt2e`` fail with "Input partition has
    more than one output node" on models that reuse a module (e.g. torchvision's BasicBlock.relu).
    """
    from compress_cli.runtime.inputs import InputSpec

    spec = InputSpec.from_example(example, model)
    args, kwargs = spec.args_kwargs(example)
    try:
        with quiet():
            ep = torch.export.export(
                model.eval(), args, kwargs=kwargs, strict=True, dynamic_shapes=spec.dynamic_shapes(1 << 20)
            )
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise StageError(
            f"torch.export.export(strict=True) failed ({type(e).__name__}: {first}); the PT2E int8 flow "
            "needs an exportable model with a dynamic batch dimension (scheme onnxruntime_int8 or "
            "int8_dynamic may still work)"
        ) from None
    return ep.module()


def elide_zero_adds(gm: Any) -> int:
    """Remove from an exported graph every ``x + 0`` (``aten.add`` / ``add_`` of a tensor and the
    number 0, as ``out = 0; out += conv(x)`` gives; exact); returns how many."""
    n = 0
    adds = {torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor, torch.ops.aten.add.Scalar}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in adds or node.kwargs.get("alpha", 1) != 1:
            continue
        a, b = node.args[:2]
        keep = (
            a
            if isinstance(b, (int, float)) and b == 0
            else b
            if isinstance(a, (int, float)) and a == 0
            else None
        )
        if isinstance(keep, torch.fx.Node):
            node.replace_all_uses_with(keep)
            gm.graph.erase_node(node)
            n += 1
    if n:
        gm.graph.lint()
        gm.recompile()
    return n


def _raised_at(e: BaseException) -> str:
    """Where an exception was raised: ``file.py:LINE in function`` of its innermost frame."""
    import traceback
    from pathlib import Path

    tb = traceback.extract_tb(e.__traceback__)
    return f"{Path(tb[-1].filename).name}:{tb[-1].lineno} in {tb[-1].name}" if tb else "?"


def prepare_graph(model: nn.Module, example: Any, quantizer: Any, qat: bool = False) -> Any:
    """Export ``model`` and prepare it with ``quantizer`` (``qat``: for quantization-aware
    training). torchao's X86InductorQuantizer asserts (no message) on a convolution added to a
    Python number (timm's MobileOne: ``out = 0; out += conv(x)``): then the graph is exported again
    with its ``x + 0`` removed, and prepared. Graphs that prepare as they are stay as they are
    (load() follows the same steps, so a stored model's observers match). Any other failure of the
    quantizer is a StageError naming where it was raised."""
    api = pt2e_api()
    prepare = api.prepare_qat if qat else api.prepare
    gm = export_graph(model, example)
    try:
        with quiet():
            return prepare(gm, quantizer)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        why = f"{type(e).__name__}{': ' + first[:200] if first else ''} at {_raised_at(e)}"
        gm = export_graph(model, example)
        zeros = elide_zero_adds(gm) if isinstance(e, AssertionError) else 0
        if zeros:
            try:
                with quiet():
                    return prepare(gm, quantizer)
            except Exception as e2:
                first = str(e2).strip().splitlines()[0] if str(e2).strip() else ""
                why += f"; again with {zeros} 'x + 0' removed: {type(e2).__name__} at {_raised_at(e2)}"
        raise StageError(
            f"torchao's X86InductorQuantizer could not annotate this model's exported graph ({why}); "
            "use scheme onnxruntime_int8 or int8_dynamic, backend: fx, or keep the layers involved in "
            "float (exclude: [module globs])"
        ) from None


def _small_eps(spec: Any) -> Any:
    """``spec`` with its observer's smallest scale lowered from 2**-12 to float32's eps."""
    import dataclasses

    ctr = spec.observer_or_fake_quant_ctr
    partial = getattr(ctr, "p", None)  # torch.ao's _PartialWrapper over a functools.partial
    if partial is None or partial.keywords.get("eps") != 2**-12:
        return spec
    args = dict(partial.keywords)
    args["eps"] = torch.finfo(torch.float32).eps
    return dataclasses.replace(spec, observer_or_fake_quant_ctr=partial.func.with_args(**args))


def x86_quantizer(reduce_range: bool, is_qat: bool = False, exclude: Iterable[str] = ()) -> Any:
    """X86InductorQuantizer: per-channel symmetric int8 weights, affine uint8 activations.

    torchao's default config floors every observer's scale at 2**-12 (``eps``, copied from the
    fbgemm qconfig): an activation spanning less than ~0.06 then has fewer than 255 levels, and one
    under 2**-12 rounds to zero (efficientnet_b0 at random init: its last blocks' activations are
    ~1e-4, int8 logits all zero, SQNR 0 dB, where ONNX Runtime, with no floor, gives 23 dB). The
    floor is float32's eps here, as torch.ao's MinMax observers use by default; oneDNN's int8
    kernels take any positive float scale."""
    import dataclasses

    api = pt2e_api()
    q = api.xiq.X86InductorQuantizer()
    cfg = api.xiq.get_default_x86_inductor_quantization_config(is_qat=is_qat, reduce_range=reduce_range)
    cfg = dataclasses.replace(
        cfg,
        input_activation=_small_eps(cfg.input_activation),
        output_activation=_small_eps(cfg.output_activation),
        weight=_small_eps(cfg.weight),
    )
    q.set_global(cfg)
    for name in exclude:
        q.set_module_name_qconfig(name, None)
    return q


def activations_at_min_scale(qparams: dict[str, dict[str, Any]]) -> list[str]:
    """The observed activations (weights left out) whose scale is the quantizer's floor, float32's
    eps (see :func:`x86_quantizer`): their calibrated range spans fewer than 255 int8 steps (max
    |x| below ~3e-5), so they keep only a few levels or round to zero, whatever the calibration
    data (lcnet_050 at random init: its pooled features, ~1e-6, keep ~8 levels)."""
    floor = torch.finfo(torch.float32).eps * (1 + 1e-6)
    return [
        k for k, p in qparams.items() if p["param"] is None and float(unpack_array(p["scale"]).max()) <= floor
    ]


def snap_pt2e_weights_(model: nn.Module, qparams: dict[str, dict[str, Any]]) -> int:
    """Snap every weight a PT2E observer quantizes; returns how many tensors."""
    params = dict(model.named_parameters())
    n = 0
    for p in qparams.values():
        if p["param"] is None:
            continue
        if p["param"] not in params:
            raise StageError(
                f"quantized weight {p['param']!r} is not a parameter of the model (cannot store it)"
            )
        scale, zero_point = unpack_array(p["scale"]), unpack_array(p["zero_point"])
        snap_(params[p["param"]], scale, zero_point, p["axis"], p["quant_min"], p["quant_max"])
        n += 1
    return n


def pt2e_calibrate(
    model: nn.Module, batches: list[torch.Tensor], reduce_range: bool, exclude: Iterable[str] = ()
) -> dict[str, dict[str, Any]]:
    """Export, ``prepare_pt2e`` with X86InductorQuantizer, run the calibration batches; -> qparams."""
    from compress_cli._utils.batches import call, take

    pm = prepare_graph(model, take(batches[0], 2), x86_quantizer(reduce_range, False, exclude))
    with quiet(), torch.no_grad():
        for x in batches:
            call(pm, x)
    return record_qparams(pm)


def prepare_qat(
    model: nn.Module, example: torch.Tensor, reduce_range: bool, exclude: Iterable[str] = ()
) -> Any:
    """A QAT-prepared exported graph (fake quantization) that ``training.train`` can train:
    ``.train()`` / ``.eval()`` switch dropout/BN through torchao's move_exported_model_to_*."""
    api = pt2e_api()
    pm = prepare_graph(model, example, x86_quantizer(reduce_range, True, exclude), qat=True)
    api.allow_train_eval(pm)
    return pm


def copy_trained_(graph: Any, model: nn.Module) -> None:
    """Copy the parameters trained inside a QAT graph back into ``model`` (same state keys)."""
    sd = graph.state_dict()
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k in sd and sd[k].shape == v.shape:
                v.copy_(sd[k])


def build_pt2e(
    model: nn.Module,
    qparams: dict[str, dict[str, Any]],
    reduce_range: bool,
    exclude: Iterable[str],
    inputs: InputSpec | Iterable[int],
) -> Any:
    """The converted int8 graph for ``model`` (weights already on the grid) with the recorded
    qparams: export, prepare, pin every observer's qparams, ``convert_pt2e``. No calibration.
    ``inputs``: the input spec (or one float tensor's sample shape) the graph is exported with."""
    from compress_cli.runtime.inputs import InputSpec

    api = pt2e_api()
    example = InputSpec.coerce(inputs).example(2)  # type: ignore[arg-type]
    pm = prepare_graph(model, example, x86_quantizer(reduce_range, False, exclude))
    pin_qparams(pm, qparams)
    with quiet():
        return api.convert(pm)


class QuantizedGraph(nn.Module):
    """An int8 graph from torchao's PT2E flow. ``compiled``: run through ``torch.compile``
    (inductor, freezing on, one compilation per batch size: inductor's dynamic-shape path
    mis-strides quantized convolutions in torch 2.14), else the converted graph in eager
    (2-3x slower than fp32: only for debugging). Inference only (``train()`` changes nothing)."""

    def __init__(self, graph: Any, compiled: bool = True):
        super().__init__()
        self.graph = graph
        self.compiled = compiled
        self.__dict__["_fn"] = None
        self.__dict__["_ready"] = {}  # (shape, dtype, inference mode) -> compiled callable

    def train(self, mode: bool = True) -> QuantizedGraph:  # exported graphs refuse train()/eval()
        """Only sets ``training``: the graph is inference only and runs the same in either mode."""
        self.training = mode
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # no module hooks: ~5% at batch 1
        return self.forward(*args, **kwargs)

    def _callable(self) -> Any:
        if self.__dict__.get("_fn") is None:
            if self.compiled:
                import torch._dynamo.config as dc

                dc.recompile_limit = max(dc.recompile_limit, 64)
                self.__dict__["_fn"] = FrozenCompiled(self.graph)
            else:
                self.__dict__["_fn"] = self.graph
        return self.__dict__["_fn"]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The graph's output for the inputs (no gradients); one tensor of a batch shape seen
        before skips all checks."""
        if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
            structure = kwargs if kwargs else args[0] if len(args) == 1 else args
            with torch.no_grad():
                return (self.__dict__.get("_fn") or self._callable())(structure)
        x = args[0]
        if not torch.is_grad_enabled():  # fast path: a batch shape already compiled
            fn = self.__dict__["_ready"].get((x.shape, x.dtype, torch.is_inference_mode_enabled()))
            if fn is not None:
                return fn(x)
        fn = self.__dict__.get("_fn") or self._callable()
        with torch.no_grad():
            out = fn(x)
            if self.compiled:
                self.__dict__["_ready"][(x.shape, x.dtype, torch.is_inference_mode_enabled())] = fn.compiled
            return out

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fn"] = None
        state["_ready"] = {}
        return state


def _graph(model: nn.Module, entry: dict[str, Any], build: Any = build_pt2e) -> Any:
    """``build`` (PT2E or FX) of the stored module with the entry's recorded qparams and input spec."""
    from compress_cli.runtime.inputs import InputSpec

    exclude = entry.get("exclude", [])
    return build(model.cpu(), entry["qparams"], entry["reduce_range"], exclude, InputSpec.from_entry(entry))


class Pt2eHandler(Int8Handler):
    """Build and measure a PT2E int8 graph (compiled: torch.compile with freezing, on CPU)."""

    def build_runtime(self, model: nn.Module, entry: dict[str, Any], device: Any = None) -> nn.Module:
        """A :class:`QuantizedGraph` over :func:`build_pt2e` with the recorded qparams."""
        return QuantizedGraph(_graph(model, entry), compiled=entry.get("compile", True))

    def runner(self, runtime: nn.Module, entry: dict[str, Any], state: State) -> Runner | None:
        """Compiled (inductor, freezing) on CPU, or eager with ``compile: false``."""
        if entry.get("compile", True):
            return CompiledRunner(runtime, torch.device("cpu"), compiled=runtime, frozen=True)
        return super().runner(runtime, entry, state)

    def trial(self, model: nn.Module, job: Int8Job) -> nn.Module:
        """As a conversion, but the runtime is the converted graph uncompiled (torch.compile takes
        minutes; its failures are not the preflight's)."""
        from compress_cli.quantization.branches import value_branches

        assert job.trial is not None
        try:
            model = self.snap(model, job)
        except StageError as e:
            found = value_branches(model, job.trial)
            if not found:
                raise
            raise StageError(
                f"{e}. Its forward reads a tensor computed from its input into Python at {found[0]} "
                "(a data-dependent branch torch.export cannot capture); rewrite it with tensor ops "
                "(torch.where) or use scheme int8_dynamic (eager)"
            ) from None
        job.entry["compile"] = False
        return self.build_runtime(model, job.entry)

    def way_out(self, options: Any) -> str:
        """Schemes that need no torch.export, the FX backend, excluding layers."""
        fx_hint = ", backend: fx" if options.scheme == "int8_static" else ""
        return (
            f"use scheme onnxruntime_int8 or int8_dynamic (no torch.export){fx_hint}, or keep the layers "
            "involved in float (exclude: [module globs])"
        )

    def export_model(self, fmt: str, state: State, entry: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """torch_export: a fresh, uncompiled int8 graph with the fp32 weights convert left behind
        stripped (exported as is, the .pt2 was 1.4x the fp32 state_dict)."""
        from compress_cli.runtime.export import drop_unused_state

        if fmt != "torch_export":
            return super().export_model(fmt, state, entry)
        return drop_unused_state(_graph(state.model, entry)), {"load": PT2E_LOAD}


@register_scheme("int8_static")
class StaticInt8(Pt2eHandler):
    """Post-training static int8: activation ranges calibrated on training batches."""

    def snap(self, model: nn.Module, job: Int8Job) -> nn.Module:
        """Fold BN, calibrate (PT2E, or FX with ``backend: fx``), snap the weights to the grid."""
        model = job.fold_batchnorm(model)
        backend = job.options.backend or _default_backend()
        batches = job.calibration()
        if job.trial is None:
            job.state.ctx.listener.on_message(f"calibrating on {len(batches)} batch(es)")
        calibrate = fx.fx_calibrate if backend == "fx" else pt2e_calibrate
        job.entry["qparams"] = calibrate(model, batches, job.reduce_range, job.exclude)
        if backend == "fx":
            job.details["quantized_weights"] = fx.snap_fx_weights_(model, job.exclude)
            job.details["backend"] = job.entry["backend"] = "fx"
        else:
            job.details["quantized_weights"] = snap_pt2e_weights_(model, job.entry["qparams"])
            job.details["backend"] = pt2e_api().where
            job.entry["compile"] = job.options.compile
            floored = activations_at_min_scale(job.entry["qparams"])
            if floored:
                job.details["activations_at_min_scale"] = floored
        return model

    def build_runtime(self, model: nn.Module, entry: dict[str, Any], device: Any = None) -> nn.Module:
        """The FX ``convert_fx`` module for ``backend: fx``, else the PT2E graph."""
        if entry.get("backend") == "fx":
            return _graph(model, entry, fx.build_fx)
        return super().build_runtime(model, entry, device)

    def runner(self, runtime: nn.Module, entry: dict[str, Any], state: State) -> Runner | None:
        """Eager on CPU for ``backend: fx``, else as for PT2E."""
        if entry.get("backend") == "fx":
            return Int8Handler.runner(self, runtime, entry, state)
        return super().runner(runtime, entry, state)

    def export_model(self, fmt: str, state: State, entry: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """fx: the torch.ao int8 module the runner measured (TorchScript traces it)."""
        if entry.get("backend") == "fx":
            return (state.runner.model if fmt == "torchscript" else None), {}
        return super().export_model(fmt, state, entry)


@register_scheme("qat")
class Qat(Pt2eHandler):
    """Quantization-aware training: fake-quant fine-tuning through the shared training loop."""

    trial_is_runtime = False  # the trial is the untrained fake-quant graph

    def trial(self, model: nn.Module, job: Int8Job) -> nn.Module:
        """Fold BN and prepare the fake-quantized graph (no training): the graph QAT would train."""
        model = job.fold_batchnorm(model)
        assert job.trial is not None
        return prepare_qat(model, job.trial, job.reduce_range, job.exclude)

    def snap(self, model: nn.Module, job: Int8Job) -> nn.Module:
        """Fold BN, fake-quant fine-tune (the ``qat`` training options), record the qparams, take the
        fp32 reference from the fine-tuned weights, then snap them to the grid."""
        from compress_cli.training import train

        model = job.fold_batchnorm(model)
        state = job.state
        from compress_cli._utils.batches import take
        from compress_cli.quantization.base import cpu_inputs

        batch = next(iter(state.data.loader("train", shuffle=False)))
        example = cpu_inputs(take(state.data.get_task().inputs(batch), 2))
        graph = prepare_qat(model, example, job.reduce_range, job.exclude)
        res = train(graph, state, job.options, label=job.label)
        graph.eval()
        copy_trained_(graph, model)
        with quiet(), torch.no_grad():
            job.entry["qparams"] = record_qparams(graph)
        job.details["training"] = res.summary()
        job.keep_reference(model.eval())  # the fine-tuned fp32 weights, before snapping
        job.details["quantized_weights"] = snap_pt2e_weights_(model, job.entry["qparams"])
        job.details["backend"] = pt2e_api().where
        job.entry["compile"] = job.options.compile
        return model


def _default_backend() -> str:
    """pt2e where torchao (or torch.ao's PT2E) is installed, else fx where torch.ao still has it."""
    try:
        pt2e_api()
    except StageError:
        return "fx" if fx.fx_available() else "pt2e"
    return "pt2e"
