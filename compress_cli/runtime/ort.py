"""ONNX Runtime as a module: what ``onnxruntime_int8`` models, the same-runtime baseline and the
``export`` stage's check run in."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compress_cli.errors import StageError
from compress_cli.runtime.export import META_OUTPUTS

#: ONNX tensor types -> numpy dtypes (what the inputs are converted to)
_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def _rebuild(structure: Any, by_name: dict[str, torch.Tensor]) -> Any:
    """The model's output from the ONNX outputs by name (see ``export.OutputLayout.structure``);
    a dict or ``ModelOutput`` comes back as a dict with the same keys, a tuple as a tuple."""
    if isinstance(structure, str):
        return by_name[structure]
    if "dict" in structure:
        return {k: _rebuild(v, by_name) for k, v in structure["dict"]}
    return tuple(_rebuild(v, by_name) for v in structure["list"])


class OrtModule(nn.Module):
    """An ONNX Runtime CPU session as an ``nn.Module``, called like the model it was exported from:
    ``m(x)``, ``m(*xs)``, ``m(**named)`` or ``m(named_dict)`` (inputs fed by name, converted to the
    file's input types); returns what the model returns (a tensor, or a dict / tuple of tensors as
    recorded in the file's metadata by :func:`~compress_cli.runtime.export.onnx_bytes`; a file
    without it: its first output).

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
            session = ort.InferenceSession(self.onnx_bytes, so, providers=["CPUExecutionProvider"])
            inputs = session.get_inputs()
            self.__dict__["_inputs"] = [(i.name, _NUMPY.get(i.type, np.float32)) for i in inputs]
            meta = session.get_modelmeta().custom_metadata_map.get(META_OUTPUTS)
            self.__dict__["_outputs"] = json.loads(meta) if meta else None
            self.__dict__["_output_names"] = [o.name for o in session.get_outputs()]
            self.__dict__["_session"] = session
        return self.__dict__["_session"]

    @property
    def input_names(self) -> list[str]:
        """The file's input names, in order."""
        self.session  # noqa: B018
        return [n for n, _ in self.__dict__["_inputs"]]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # no module hooks: ~8% at batch 1
        return self.forward(*args, **kwargs)

    def _feeds(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, np.ndarray]:
        specs = self.__dict__["_inputs"]
        if len(args) == 1 and not kwargs and isinstance(args[0], dict):
            kwargs, args = args[0], ()
        elif len(args) == 1 and not kwargs and isinstance(args[0], (tuple, list)):
            args = tuple(args[0])
        if kwargs:
            missing = [n for n, _ in specs if n not in kwargs]
            if missing or args:
                raise StageError(
                    f"ONNX model inputs: {', '.join(n for n, _ in specs)}; got {', '.join(map(str, kwargs))}"
                )
            values = [kwargs[n] for n, _ in specs]
        else:
            if len(args) != len(specs):
                raise StageError(f"the ONNX model takes {len(specs)} input(s), got {len(args)}")
            values = list(args)
        feeds = {}
        for (name, dtype), v in zip(specs, values, strict=True):
            if isinstance(v, torch.Tensor):
                v = v.detach().cpu().contiguous().numpy()
            feeds[name] = np.asarray(v, dtype=dtype)
        return feeds

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The session's outputs for the inputs, in the model's output structure."""
        session = self.__dict__.get("_session") or self.session
        x = args[0] if len(args) == 1 and not kwargs else None
        specs = self.__dict__["_inputs"]
        if isinstance(x, torch.Tensor) and len(specs) == 1 and specs[0][1] is np.float32:  # fast path
            if x.requires_grad or x.device.type != "cpu" or x.dtype != torch.float32:
                x = x.detach().cpu().float()
            outs = session.run(None, {specs[0][0]: x.contiguous().numpy()})
        else:
            outs = session.run(None, self._feeds(args, kwargs))
        structure = self.__dict__["_outputs"]
        if structure is None or isinstance(structure, str):
            return torch.from_numpy(outs[0])
        names = self.__dict__["_output_names"]
        return _rebuild(structure, {n: torch.from_numpy(o) for n, o in zip(names, outs, strict=True)})

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
