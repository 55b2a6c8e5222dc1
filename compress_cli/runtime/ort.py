"""ONNX Runtime as a module: what ``onnxruntime_int8`` models and the same-runtime baseline run in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress_cli.runtime.export import ONNX_INPUT


class OrtModule(nn.Module):
    """An ONNX Runtime CPU session as an ``nn.Module``: ``forward(x: Tensor) -> Tensor``.

    ``onnx_bytes`` is the model file (``save(path)`` writes it); ``threads`` sets intra-op threads
    (None: ONNX Runtime's default). Inference only: no parameters, no gradients. The session is
    created on first use and not pickled."""

    def __init__(self, onnx_bytes: bytes, threads: int | None = None):
        super().__init__()
        self.onnx_bytes = onnx_bytes
        self.threads = threads
        self.__dict__["_session"] = None

    @property
    def session(self) -> Any:
        """The ``onnxruntime.InferenceSession`` (CPU provider, all graph optimizations)."""
        if self.__dict__.get("_session") is None:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.log_severity_level = 3
            if self.threads:
                so.intra_op_num_threads = int(self.threads)
                so.inter_op_num_threads = 1
            self.__dict__["_session"] = ort.InferenceSession(
                self.onnx_bytes, so, providers=["CPUExecutionProvider"]
            )
        return self.__dict__["_session"]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # no module hooks: ~8% at batch 1
        return self.forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for ``x`` (taken as CPU float32) from the session."""
        session = self.__dict__.get("_session") or self.session
        if x.requires_grad or x.device.type != "cpu" or x.dtype != torch.float32:
            x = x.detach().cpu().float()
        return torch.from_numpy(session.run(None, {ONNX_INPUT: x.contiguous().numpy()})[0])

    def save(self, path: str | Path) -> Path:
        """Write the model file atomically; returns its path."""
        from compress_cli._utils.io import atomic_write_bytes

        p = Path(path)
        atomic_write_bytes(p, self.onnx_bytes)
        return p

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_session"] = None
        return state
