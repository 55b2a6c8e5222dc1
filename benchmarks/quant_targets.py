"""Issue 18: ``quantize`` with ``scheme: auto`` against NNCF + OpenVINO and ONNX Runtime's
``quantize_static`` used directly, at batch 1 and 64, 1 and 2 threads, in one process.

For one model (``--model fashion | resnet18 | mobilenet_v3_large``):

1. every ``scheme: auto`` candidate (torch, onnxruntime, openvino; the openvino ones also with
   ``inference_precision: bf16`` where the CPU has bf16 units) is converted and scored once,
   through :func:`compress_cli.quantization.auto.convert_all` (what the stage does);
2. the peers are built by hand from the libraries' own defaults, calibrated on the same batches:
   ``openvino.convert_model`` + ``nncf.quantize`` compiled with OpenVINO's defaults (bf16 inference
   on a CPU with bf16 units, as a direct user gets it) and, separately, with f32 inference as ours;
   ``torch.onnx.export`` + ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel);
3. per (batch, threads): everything is timed interleaved with the fp32 model in torch eager
   (:func:`compress_cli.quantization.auto.interleaved_latency`: rounds x runners, median of the
   rounds' medians, an idle gap between runners) under an exclusive ``/tmp/quiet.lock`` (taken
   here, for the timing only), and ``auto.decide`` picks ours from the same timings, as
   ``scheme: auto`` with that target would.

Writes one JSON line per (model, batch, threads) to ``--out``. Every choice and drop is scored on
the split ``scheme: auto`` selects on (``budget.selection_split``: validation). The fashion CNN
is trained (accuracy budget 1.0 point); resnet18 and mobilenet_v3_large are random init at
224x224 on synthetic data (speed only: their budget is 100 points), with their batch-norm
statistics re-estimated on the calibration batches before anything is converted
(:func:`reestimate_batchnorm`): BN running stats of (0, 1) at random init leave some networks'
activations near zero (mobilenet_v3_large: every int8 conversion at 0 dB output SQNR), which no
trained network has. Ours and every peer get that same model. On those random-init models our
candidates' SQNR gate is lowered to ``MIN_SQNR_SPEED_ONLY`` dB (``min_sqnr_db`` of the auto stage,
as a speed-only run would set it; NNCF and ``quantize_static`` have no gate): random logits are a
poor fidelity signal, and every output SQNR (ours and the peers', on one batch of the selection
split) is recorded in the JSON line.

    PYTHONPATH=. python benchmarks/quant_targets.py --model fashion --fashion-model runs/fashion_train/model
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from compress_cli.config.yaml import parse_yaml
from compress_cli.engine.setup import build_state
from compress_cli.quantization import auto
from compress_cli.quantization.base import sqnr_db
from compress_cli.quantization.budget import selection_split as budget_split
from compress_cli.runtime.measure import evaluate
from compress_cli.stages.quantize import QuantizeConfig
from compress_cli.stages.registry import validate

LOCK = "/tmp/quiet.lock"
#: the SQNR gate of our candidates on the random-init (speed-only) models, dB
MIN_SQNR_SPEED_ONLY = 5.0
PEERS = ("nncf+openvino (defaults)", "nncf+openvino (f32)", "ort quantize_static")


@contextlib.contextmanager
def lock(exclusive: bool) -> Iterator[None]:
    """The shared CPU etiquette lock: shared while converting, exclusive while timing, nothing held
    in between (a run holding it shared throughout would keep every other timing job waiting)."""
    with open(LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def recipe(model: str, fashion_model: str | None, out: Path) -> dict[str, Any]:
    """The recipe each model runs under (data, calibration, the quantize stage)."""
    if model == "fashion":
        m: dict[str, Any] = {"source": "zoo:fashion_cnn"}
        if fashion_model:
            m["checkpoint"] = fashion_model
        data = {
            "source": "fashion_mnist",
            "root": "/usr/share/datasets/fashion-mnist",
            "batch_size": 128,
            "val_fraction": 0.1,
            "calibration_batches": 16,
        }
    else:
        m = {"source": f"torchvision:{model}", "input_shape": [3, 224, 224], "kwargs": {"num_classes": 10}}
        data = {
            "source": "synthetic",
            "batch_size": 16,
            "calibration_batches": 4,
            "kwargs": {"train_size": 64, "test_size": 64},
        }
    return {
        "version": 1,
        "name": f"quant_targets_{model}",
        "seed": 0,
        "device": "cpu",
        "model": m,
        "data": data,
        "measure": {"latency": None, "macs": False},
        "stages": [{"type": "quantize", "scheme": "auto"}],
        "output": str(out),
    }


class Fn:
    """A callable as a runner (prepare + call), for evaluate and interleaved_latency."""

    def __init__(self, fn: Any):
        self.fn = fn

    def prepare(self) -> None:
        pass

    def __call__(self, x: Any) -> Any:
        with torch.inference_mode():
            return self.fn(x)


def reestimate_batchnorm(model: torch.nn.Module, batches: list[torch.Tensor]) -> dict[str, Any]:
    """Re-estimate ``model``'s batch-norm running statistics on ``batches`` in place: reset, one
    train-mode forward per batch with ``momentum=None`` (a cumulative average over all batches,
    not an exponential one), then eval with the original momenta. Only the BN layers run in train
    mode (dropout stays off). Returns what was done, for the JSON line."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    for m, mom in zip(bns, momenta, strict=True):
        m.momentum = mom
    model.eval()
    return {"bn_layers": len(bns), "batches": len(batches), "samples": sum(len(x) for x in batches)}


def direct_nncf(model: torch.nn.Module, calib: list[torch.Tensor]) -> Any:
    """openvino.convert_model + nncf.quantize with their defaults -> the quantized ov.Model."""
    import nncf
    import openvino as ov

    om = ov.convert_model(copy.deepcopy(model).eval(), example_input=calib[0][:2])
    return nncf.quantize(om, nncf.Dataset([x.numpy() for x in calib]))


def ov_runner(om: Any, threads: int, f32: bool) -> Fn:
    """The ov.Model compiled for CPU with ``threads`` (f32: our precision; else OpenVINO's default)."""
    import openvino as ov

    cfg: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if f32:
        cfg["INFERENCE_PRECISION_HINT"] = "f32"
    req = ov.Core().compile_model(om, "CPU", cfg).create_infer_request()

    def run(x: torch.Tensor) -> torch.Tensor:
        req.infer({0: x.numpy()})
        return torch.from_numpy(np.array(req.get_output_tensor(0).data))

    return Fn(run)


def direct_ort(model: torch.nn.Module, calib: list[torch.Tensor], tmp: Path) -> bytes:
    """torch.onnx.export + onnxruntime.quantization.quantize_static (QDQ, per-channel) -> file bytes."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    fp32, q = tmp / "fp32.onnx", tmp / "int8.onnx"
    torch.onnx.export(
        copy.deepcopy(model).eval(),
        (calib[0][:2],),
        str(fp32),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    feeds = iter([{"input": x.numpy()} for x in calib])

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(feeds, None)

    quantize_static(str(fp32), str(q), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    return q.read_bytes()


def ort_runner(data: bytes, threads: int) -> Fn:
    """An ONNX Runtime CPU session over ``data`` with ``threads`` intra-op threads."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    return Fn(lambda x: torch.from_numpy(sess.run(None, {"input": x.numpy()})[0]))


def set_threads(runner: Any, threads: int) -> None:
    """Point a candidate's runner at ``threads`` (ONNX Runtime / OpenVINO rebuild their session)."""
    mod = getattr(runner, "model", None)
    if hasattr(mod, "threads"):
        mod.threads = threads
        mod.__dict__["_session"] = None
        mod.__dict__["_request"] = None
        runner.threads = threads


def table(path: str) -> str:
    """The RESULTS.md table of the lines in ``path``: ours vs the best peer within 0.5 points more drop."""
    out = [
        "| model | batch | threads | fp32 eager ms | ours (auto's choice) | ours ms | ours drop | "
        "nncf+ov defaults ms (drop) | nncf+ov f32 ms (drop) | ort quantize_static ms (drop) | "
        "best peer within +0.5 drop | its ms / ours (>1: ours faster) |",
        "|" + "---|" * 12,
    ]
    for line in Path(path).read_text().splitlines():
        d = json.loads(line)
        peers = d["peers"]
        ok = {k: v for k, v in peers.items() if v["drop"] <= d["ours_drop"] + 0.5}
        best = min(ok, key=lambda k: ok[k]["ms"]) if ok else None
        cells = [
            f"{peers[k]['ms']:.3f} ({peers[k]['drop']:+.2f})" if k in peers else "failed to compile"
            for k in PEERS
        ]
        ratio = f"{ok[best]['ms'] / d['ours_ms']:.2f}x" if best else "-"
        out.append(
            f"| {d['model']} | {d['batch']} | {d['threads']} | {d['fp32_ms']:.3f} | {d['ours']} | "
            f"{d['ours_ms']:.3f} | {d['ours_drop']:+.2f} | {' | '.join(cells)} | {best or '-'} | {ratio} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--table", default=None, help="print the markdown table of a --out file and exit")
    ap.add_argument("--model", choices=["fashion", "resnet18", "mobilenet_v3_large"])
    ap.add_argument("--fashion-model", default=None, help="trained fashion_cnn model directory")
    ap.add_argument("--settings", default="1x1,64x1,1x2,64x2", help="BATCHxTHREADS,...")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/quant_targets.jsonl")
    args = ap.parse_args()
    if args.table:
        print(table(args.table))
        return
    if args.model is None:
        ap.error("--model is required")
    budget = 1.0 if args.model == "fashion" else 100.0
    with tempfile.TemporaryDirectory(prefix="quant-targets-") as d:
        converting = lock(exclusive=False)
        converting.__enter__()
        tmp = Path(d)
        r = validate(parse_yaml(yaml.safe_dump(recipe(args.model, args.fashion_model, tmp / "out"))))
        state = build_state(r, torch.device("cpu"), tmp / "out")
        torch.set_num_threads(2)
        task, split = state.data.get_task(), budget_split(state)
        calib = state.data.calibration_inputs()[: state.data.calibration_batches]  # what ours uses
        bn = None if args.model == "fashion" else reestimate_batchnorm(state.model, calib)
        gate = {} if args.model == "fashion" else {"min_sqnr_db": MIN_SQNR_SPEED_ONLY}
        opts = QuantizeConfig(type="quantize", scheme="auto", **gate)
        t0 = time.perf_counter()
        fp32, ref, cands = auto.convert_all(state, opts, "quantize", list(auto.RUNTIMES))
        ours_s = time.perf_counter() - t0
        model = state.model.cpu().eval()
        t0 = time.perf_counter()
        nncf_model = direct_nncf(model, calib)
        ort_bytes = direct_ort(model, calib, tmp)
        peers_s = time.perf_counter() - t0

        def score(fn: Any) -> float:
            return float(evaluate(fn, state.data.loader(split), task, split=split)[task.primary])

        makers = {
            "nncf+openvino (defaults)": lambda t: ov_runner(nncf_model, t, f32=False),
            "nncf+openvino (f32)": lambda t: ov_runner(nncf_model, t, f32=True),
            "ort quantize_static": lambda t: ort_runner(ort_bytes, t),
        }
        peer_scores, peers_failed, peer_sqnr = {}, {}, {}
        xs = task.inputs(next(iter(state.data.loader(split))))
        y_ref = fp32(xs)
        for k, make in makers.items():
            try:
                peer_scores[k] = score(make(2))
                peer_sqnr[k] = sqnr_db(y_ref, make(2)(xs))
            except RuntimeError as e:  # e.g. OpenVINO's bf16 CPU path: "No suitable implementations"
                peers_failed[k] = f"{type(e).__name__}: {' '.join(str(e).split())[-200:]}"
        makers = {k: v for k, v in makers.items() if k in peer_scores}
        converting.__exit__(None, None, None)
        ok = [c for c in cands if c.error is None]
        for c in ok:
            c.row["drop"] = auto.drop_points(task, ref, c.row["score"])
        for setting in args.settings.split(","):
            batch, threads = (int(v) for v in setting.split("x"))
            for c in ok:
                set_threads(c.runner, threads)
            peers = {k: make(threads) for k, make in makers.items()}
            runners = {auto.FP32: fp32, **{c.name: c.runner for c in ok}, **peers}
            x = state.data.example_input(batch)
            iters = 20 if batch == 1 else 3
            with lock(exclusive=True):
                lat = auto.interleaved_latency(runners, x, threads, rounds=args.rounds, iterations=iters)
            for c in ok:
                c.row["latency"] = lat[c.name]
            winner = auto.decide(ok, lat[auto.FP32], budget)
            line = {
                "model": args.model,
                "batch": batch,
                "threads": threads,
                "fp32_score": ref,
                "split": split,
                "batchnorm_reestimated": bn,
                "fp32_ms": lat[auto.FP32] * 1e3,
                "ours": winner.name if winner else "fp32 (nothing faster)",
                "ours_ms": (winner.row["latency"] if winner else lat[auto.FP32]) * 1e3,
                "ours_drop": winner.row["drop"] if winner else 0.0,
                "candidates": {
                    c.name: {
                        "ms": c.row["latency"] * 1e3,
                        "drop": c.row["drop"],
                        "why": c.row["why"],
                        "sqnr_db": (c.done.details.get("sqnr_db") if c.done is not None else None),
                    }
                    for c in ok
                },
                "failed": {c.name: c.error for c in cands if c.error is not None},
                "peers": {
                    k: {
                        "ms": lat[k] * 1e3,
                        "drop": auto.drop_points(task, ref, peer_scores[k]),
                        "sqnr_db": peer_sqnr[k],
                    }
                    for k in peers
                },
                "peers_failed": peers_failed,
                "convert_s": {"ours (all candidates)": ours_s, "peers": peers_s},
                "min_sqnr_db": opts.min_sqnr_db,
                "rounds": args.rounds,
                "iterations": iters,
            }
            with open(args.out, "a") as f:
                f.write(json.dumps(line) + "\n")
            print(json.dumps(line))


if __name__ == "__main__":
    main()
