"""Issue 6 quantization: our ``quantize`` stage against the same operation written by hand with the
libraries, on the trained Fashion-MNIST CNN (runs/fashion_train/model), in one process.

1. runs recipes/fashion_int8_cpu.yaml (int8_static) and recipes/fashion_int8_onnx.yaml
   (onnxruntime_int8) through the pipeline and keeps their report numbers;
2. builds the same models by hand: torchao PT2E (export strict -> prepare_pt2e with
   X86InductorQuantizer -> calibrate -> convert_pt2e -> torch.compile with inductor freezing), and
   torch.onnx.export -> onnxruntime quant_pre_process -> quantize_static (QDQ, per-channel),
   calibrated on the same batches;
3. evaluates ours (as reloaded by compress_cli.load: what the report measured) and the hand-made
   ones on the test split, and times all of them, plus the fp32 original in torch eager / compiled /
   ONNX Runtime, interleaved (rounds x candidates, median of per-round medians) with one thread.

    PYTHONPATH=. python benchmarks/bench_quant.py [--model runs/fashion_train/model] [--rounds 7]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import compress_cli
from compress_cli.engine.run import run_recipe
from compress_cli.engine.setup import build_state
from compress_cli.quantization import fx
from compress_cli.quantization.cpu import choose_reduce_range
from compress_cli.quantization.fold import fold_batchnorm
from compress_cli.runtime.export import fp32_onnx
from compress_cli.runtime.measure import evaluate
from compress_cli.runtime.ort import OrtModule
from compress_cli.runtime.runners import FrozenCompiled
from compress_cli.stages.registry import load_recipe

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [("ours int8_static", "direct pt2e"), ("ours onnxruntime_int8", "direct ort quantize_static")]


class Fn:
    """A callable as a runner for compress_cli.runtime.measure.evaluate."""

    def __init__(self, fn: Any):
        self.fn = fn

    def prepare(self) -> None:
        pass

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.fn(x)


def direct_pt2e(model: torch.nn.Module, calib: list[torch.Tensor], reduce_range: bool) -> Any:
    """torchao's documented PT2E flow, by hand."""
    import torch._inductor.config as inductor_config
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    example = calib[0][:2]
    ep = torch.export.export(
        model.eval(),
        (example,),
        strict=True,
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
    )
    quantizer = xiq.X86InductorQuantizer().set_global(
        xiq.get_default_x86_inductor_quantization_config(reduce_range=reduce_range)
    )
    prepared = prepare_pt2e(ep.module(), quantizer)
    with torch.no_grad():
        for x in calib:
            prepared(x)
    converted = convert_pt2e(prepared)
    inductor_config.freezing = True
    # dynamic=False: with the default (automatic dynamic shapes after a second batch size) torch 2.14's
    # inductor mis-strides quantized convolutions and the logits go wrong (12 dB SQNR measured)
    return torch.compile(converted, dynamic=False)


def direct_ort(
    model: torch.nn.Module, calib: list[torch.Tensor], reduce_range: bool, threads: int, tmp: Path
) -> Any:
    """torch.onnx.export + ONNX Runtime quant_pre_process + quantize_static, by hand."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32, pre, q = tmp / "fp32.onnx", tmp / "pre.onnx", tmp / "int8.onnx"
    torch.onnx.export(
        model.eval(),
        (calib[0][:2],),
        str(fp32),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    quant_pre_process(str(fp32), str(pre))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": x.numpy()} for x in calib])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    quantize_static(
        str(pre),
        str(q),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=reduce_range,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(str(q), so, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(sess.run(None, {"input": x.numpy()})[0]), q.stat().st_size


def time_interleaved(
    cands: dict[str, Any], shape: tuple[int, ...], batches: tuple[int, ...], rounds: int
) -> dict[str, dict[str, dict[int, float]]]:
    """Median and minimum wall time (ms) per candidate; candidates alternate call by call in a
    shuffled order (so no model always runs after the same one and inherits its cache state), and
    load from other processes on a shared machine hits all of them alike."""
    import random

    rng = random.Random(0)
    out: dict[str, dict[int, list[float]]] = {k: {b: [] for b in batches} for k in cands}
    g = torch.Generator().manual_seed(0)
    names = list(cands)
    with torch.inference_mode():
        for b in batches:
            x = torch.randn(b, *shape, generator=g)
            for fn in cands.values():
                for _ in range(5):
                    fn(x)
            for _ in range(rounds * (40 if b == 1 else 10)):
                rng.shuffle(names)
                for k in names:
                    fn = cands[k]
                    t0 = time.perf_counter()
                    fn(x)
                    out[k][b].append(time.perf_counter() - t0)
    return {
        "median": {k: {b: statistics.median(v) * 1e3 for b, v in d.items()} for k, d in out.items()},
        "min": {k: {b: min(v) * 1e3 for b, v in d.items()} for k, d in out.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runs/fashion_train/model")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp())
    reports: dict[str, dict[str, Any]] = {}
    models: dict[str, Any] = {}
    for scheme, name in (("int8_static", "fashion_int8_cpu"), ("onnxruntime_int8", "fashion_int8_onnx")):
        recipe, _ = load_recipe(
            ROOT / "recipes" / f"{name}.yaml", [f"output={tmp / name}", f"model.checkpoint={args.model}"]
        )
        t0 = time.perf_counter()
        reports[scheme] = run_recipe(recipe)
        reports[scheme]["wall_s"] = time.perf_counter() - t0
        models[scheme] = compress_cli.load(tmp / name / "model")
        print(f"{name}: ran in {reports[scheme]['wall_s']:.0f} s", flush=True)

    # the same data, calibration batches and threads as the recipes
    state = build_state(recipe, torch.device("cpu"), tmp / "state")
    calib = [x for x, _ in state.data.calibration()]
    reduce_range, why = choose_reduce_range()
    original = copy.deepcopy(state.original_model()).eval()
    torch.set_num_threads(args.threads)
    direct_static = direct_pt2e(copy.deepcopy(original), calib, reduce_range)
    direct_onnx, direct_onnx_bytes = direct_ort(
        copy.deepcopy(original), calib, reduce_range, args.threads, tmp
    )
    ours_onnx = models["onnxruntime_int8"]
    ours_onnx.threads = args.threads
    ours_onnx.__dict__["_session"] = None
    folded, _ = fold_batchnorm(original)  # our FX fallback (int8_static backend: fx), same calibration
    fx_qparams = fx.fx_calibrate(folded, calib, reduce_range)
    fx.snap_fx_weights_(folded)
    ours_fx = fx.build_fx(folded, fx_qparams, reduce_range, [], state.data.input_shape)
    fp32_ort = OrtModule(fp32_onnx(original, state.data.input_shape)[0], threads=args.threads)
    cands = {
        "fp32 eager": original,
        "fp32 compiled": FrozenCompiled(copy.deepcopy(original)),
        "fp32 onnxruntime": fp32_ort,
        "ours int8_static": models["int8_static"],
        "direct pt2e": direct_static,
        "ours int8_static backend fx (eager)": ours_fx,
        "ours onnxruntime_int8": ours_onnx,
        "direct ort quantize_static": direct_onnx,
    }
    test = state.data.loader("test")
    acc = {}
    for k, fn in cands.items():
        acc[k] = evaluate(Fn(fn), test, state.data.num_classes)["accuracy"] * 100
    times = time_interleaved(cands, tuple(state.data.input_shape), (1, 64), args.rounds)
    pairs = {}  # ours against direct, timed as a pair only (no third model between their calls)
    for a, d in PAIRS:
        pairs[f"{a} / {d}"] = time_interleaved(
            {a: cands[a], d: cands[d]}, tuple(state.data.input_shape), (1, 64), args.rounds * 3
        )
    cpu = next(
        (
            ln.partition(":")[2].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        "unknown CPU",
    )
    result = {
        "accuracy": acc,
        "latency_ms": times,
        "pairs": pairs,
        "reduce_range": reduce_range,
        "reduce_range_reason": why,
        "cpu": cpu,
        "threads": args.threads,
        "rounds": args.rounds,
        "direct_onnx_bytes": direct_onnx_bytes,
        "reports": {
            k: {"baseline": r["baseline"], "final": r["final"], "stage": r["stages"][-1]}
            for k, r in reports.items()
        },
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    print(markdown(result))


def markdown(r: dict[str, Any]) -> str:
    acc, t, tmin = r["accuracy"], r["latency_ms"]["median"], r["latency_ms"]["min"]
    lines = [
        "## Issue 6: quantization",
        "",
        "Fashion-MNIST CNN (`zoo:fashion_cnn`, runs/fashion_train/model), CPU "
        f"({r['cpu']}), {r['threads']} thread(s), reduce_range={r['reduce_range']} "
        f"({r['reduce_range_reason']}). "
        "Written by `benchmarks/bench_quant.py`; the machine was shared with other jobs while it ran.",
        "",
        "### The recipes, as the pipeline measured them (report.json)",
        "",
        "Speed-ups are medians measured by the pipeline in one run each: against the fp32 original in torch "
        "eager "
        "(report `speedup` = batch-1 latency ratio, `throughput_ratio` = batch-64 throughput ratio) and "
        "against the "
        "original in the same runtime (`final.same_runtime_baseline`).",
        "",
        "| recipe | scheme | top-1 % fp32 → int8 | drop (points) | runtime | b1 speedup vs fp32 eager | b64 "
        "throughput vs fp32 eager "
        "| b1 vs original in same runtime | b64 vs original in same runtime | logit SQNR dB | checkpoint "
        "(fp32 state_dict → ours) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for scheme, rep in r["reports"].items():
        b, f, st = rep["baseline"], rep["final"], rep["stage"]
        same = f.get("same_runtime_baseline") or {}
        s1 = same["latency_ms"] / f["latency_ms"] if same else float("nan")
        s64 = f["throughput"] / same["throughput"] if same else float("nan")
        name = {"int8_static": "fashion_int8_cpu", "onnxruntime_int8": "fashion_int8_onnx"}[scheme]
        lines.append(
            f"| {name} | {scheme} | {b['accuracy'] * 100:.2f} → {f['accuracy'] * 100:.2f} | "
            f"{f['accuracy_drop']:+.2f} "
            f"| {f['runtime']} | {f['speedup']:.2f}× | {f['throughput_ratio']:.2f}× | {s1:.2f}× | {s64:.2f}× "
            f"| {st['details'].get('sqnr_db')} | {b['fp32_bytes'] / 1024:.0f} KB → "
            f"{f['size_bytes'] / 1024:.0f} KB "
            f"({b['fp32_bytes'] / f['size_bytes']:.1f}×) |"
        )
    f1, f64 = tmin["fp32 eager"][1], tmin["fp32 eager"][64]
    lines += [
        "",
        "### Ours against the libraries used directly (one process, call-by-call interleaved timing)",
        "",
        f"{r['rounds']}x40 calls at batch 1 and {r['rounds']}x10 at batch 64 per model, the models "
        "alternating call by "
        "call in a shuffled order. Ours = the module `compress_cli.load()` returns (what the report "
        "measured). The minimum estimates the "
        "time without interference from other jobs; the median includes it.",
        "",
        "| model | top-1 % | b1 ms min / median | b1 × fp32 eager (min) | b64 ms min / median | b64 × fp32 "
        "eager (min) |",
        "|---|---|---|---|---|---|",
    ]
    for k in t:
        lines.append(
            f"| {k} | {acc[k]:.2f} | {tmin[k][1]:.3f} / {t[k][1]:.3f} | {f1 / tmin[k][1]:.2f}× "
            f"| {tmin[k][64]:.2f} / {t[k][64]:.2f} | {f64 / tmin[k][64]:.2f}× |"
        )
    lines += [
        "",
        f"Ours against direct, timed as a pair ({r['rounds'] * 3}x40 / {r['rounds'] * 3}x10 calls each, "
        "alternating "
        "in a shuffled order, no other model in between); speed ratio = direct time / our time (1.0 = "
        "equal).",
        "",
        "| ours vs direct | accuracy difference (points) | speed ours/direct b1 (min; median) "
        "| speed ours/direct b64 (min; median) |",
        "|---|---|---|---|",
    ]
    for a, d in PAIRS:
        p = r["pairs"][f"{a} / {d}"]
        pm, pmed = p["min"], p["median"]
        lines.append(
            f"| {a} / {d} | {acc[a] - acc[d]:+.2f} | {pm[d][1] / pm[a][1]:.3f}; "
            f"{pmed[d][1] / pmed[a][1]:.3f} "
            f"| {pm[d][64] / pm[a][64]:.3f}; {pmed[d][64] / pmed[a][64]:.3f} |"
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
