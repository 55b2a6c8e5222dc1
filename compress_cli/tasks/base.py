"""The task protocol: what a model is fed, which of its outputs is scored, and how it is trained
and scored. Every measurement, training loop, guard and search goes through one :class:`Task`.

A task has four jobs:

- :meth:`Task.split` turns a batch from the data loader into ``(inputs, target)``: inputs are what
  ``forward`` receives (see :mod:`compress_cli._utils.batches`), the target is None for unlabelled
  data;
- :meth:`Task.select` picks the tensor the metrics see from whatever ``forward`` returned (a
  tensor, a tuple, a dict, a Hugging Face ``ModelOutput``), optionally pooled;
- :meth:`Task.loss` is the training loss of a selected output against the target and/or the
  original model's output on the same inputs (``reference``);
- :meth:`Task.evaluator` accumulates the task's metrics over batches; ``primary`` names the one
  guards and hpo use, ``higher_is_better`` its direction.

A custom task (``task: {source: package.module:callable}``) is any object with these members;
subclassing :class:`Task` gives the batch splitting and output selection for free.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from compress_cli.errors import SourceError, StageError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from compress_cli.config.recipe import TaskConfig

#: dict-batch keys taken as the target when ``task.target`` is not set
TARGET_KEYS = ("labels", "label", "target", "targets", "y")
#: output keys tried, in order, when ``task.output`` is not set and forward returns a mapping
OUTPUT_KEYS = ("logits", "sentence_embedding", "last_hidden_state", "out", "pooler_output")


class Evaluator:
    """Accumulates metrics over batches: ``update`` per batch, ``compute`` at the end.

    Subclasses keep running sums; ``compute`` returns the task's metrics (fractions, dB, ...) and
    ``samples``."""

    def __init__(self) -> None:
        self.samples = 0

    def update(self, pred: torch.Tensor, target: Any, reference: torch.Tensor | None) -> None:
        """Add one batch: the selected output ``pred`` (float, CPU), its target (None when
        unlabelled) and the original model's selected output (None unless the task needs it)."""
        self.samples += int(pred.shape[0])

    def compute(self) -> dict[str, float]:
        """The metrics over every batch so far (with ``samples``)."""
        return {"samples": self.samples}


class Task:
    """Base class of the built-in tasks; see the module docstring for the protocol."""

    #: the name ``task.type`` selects (``custom`` tasks report their class name)
    name: ClassVar[str] = "task"
    #: the metric guards and hpo use by default, and its direction
    primary: str = "loss"
    higher_is_better: bool = False
    #: whether the task can score a model without labels / needs the original model's outputs
    needs_labels: ClassVar[bool] = True
    needs_reference: ClassVar[bool] = False
    #: what the metrics mean, for ``compress tasks`` and the report's definitions
    metrics: ClassVar[dict[str, str]] = {}
    #: the ``task.kwargs`` the task reads: name -> (default, meaning); None: not checked (a custom
    #: task reads what it likes), otherwise any other key is a RecipeError
    options: ClassVar[dict[str, tuple[Any, str]] | None] = None

    def __init__(self, cfg: TaskConfig, num_classes: int | None = None):
        self.cfg = cfg
        self.num_classes = num_classes
        if self.options is not None:
            unknown = sorted(set(cfg.kwargs) - set(self.options))
            if unknown:
                from compress_cli.errors import RecipeError, did_you_mean

                takes = f"takes only {', '.join(self.options)}" if self.options else "takes no kwargs"
                raise RecipeError(
                    f"task.kwargs: {self.name} {takes} (got {', '.join(unknown)})"
                    f"{did_you_mean(unknown[0], self.options)}"
                )
        if cfg.primary is not None:
            if self.metrics and cfg.primary not in self.metrics:
                from compress_cli.errors import RecipeError, did_you_mean

                raise RecipeError(
                    f"task.primary: {self.name} has no metric {cfg.primary!r} "
                    f"(metrics: {', '.join(self.metrics)}){did_you_mean(cfg.primary, self.metrics)}"
                )
            self.primary = cfg.primary
            self.higher_is_better = self.direction(cfg.primary)
        #: the original model's selected output for some inputs (set by the engine; see Reference)
        self.reference: Reference | None = None

    @staticmethod
    def direction(metric: str) -> bool:
        """Whether a higher ``metric`` is better (losses and errors are lower-is-better)."""
        lower = ("loss", "mse", "mae", "rmse", "relative_mse", "error", "distance")
        return not any(metric == w or metric.endswith("_" + w) for w in lower)

    # -- batches -------------------------------------------------------------------------------
    def split(self, batch: Any) -> tuple[Any, Any]:
        """``(inputs, target)`` of a loader batch (target None when the batch has none)."""
        cfg = self.cfg
        if isinstance(batch, Mapping):
            key = cfg.target
            if key is None:
                key = next((k for k in TARGET_KEYS if k in batch), None)
            elif key not in batch:
                raise SourceError(f"task.target: the batch has no key {key!r} (keys: {', '.join(batch)})")
            names = cfg.inputs if cfg.inputs is not None else [k for k in batch if k != key]
            missing = [n for n in names if n not in batch]
            if missing:
                raise SourceError(
                    f"task.inputs: the batch has no key {missing[0]!r} (keys: {', '.join(batch)})"
                )
            return {str(n): batch[n] for n in names}, (batch[key] if key is not None else None)
        if isinstance(batch, (tuple, list)):
            n = len(batch)
            target = cfg.target
            if target is None:
                target = n - 1 if n >= 2 else None
            elif not isinstance(target, int) or not -n <= target < n:
                raise SourceError(f"task.target: {target!r} is not a position of a {n}-element batch")
            if cfg.inputs is not None:
                pos = [i for i in cfg.inputs if not isinstance(i, int) or not -n <= i < n]
                if pos:
                    raise SourceError(f"task.inputs: {pos[0]!r} is not a position of a {n}-element batch")
                picked = [batch[int(i)] for i in cfg.inputs]
            else:
                t = None if target is None else target % n
                picked = [b for i, b in enumerate(batch) if i != t]
            inputs = picked[0] if len(picked) == 1 else tuple(picked)
            return inputs, (batch[target] if target is not None else None)
        return batch, None

    def inputs(self, batch: Any) -> Any:
        """The model inputs of a loader batch."""
        return self.split(batch)[0]

    def select(self, output: Any, inputs: Any = None) -> torch.Tensor:
        """The tensor the metrics see, picked from ``forward``'s return value (see ``task.output``)."""
        import torch

        sel = self.cfg.output
        if sel in ("mean_pool", "cls"):
            hidden = _pick(output, None, ("last_hidden_state", "token_embeddings"))
            if hidden.dim() != 3:
                raise StageError(
                    f"task.output: {sel} needs (batch, tokens, features), got {list(hidden.shape)}"
                )
            if sel == "cls":
                out = hidden[:, 0]
            else:
                mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
                if mask is None:
                    out = hidden.mean(1)
                else:
                    m = mask.to(hidden.dtype).unsqueeze(-1)
                    out = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        else:
            out = _pick(output, sel, OUTPUT_KEYS)
        if not isinstance(out, torch.Tensor):
            raise StageError(f"task.output: the selected output is a {type(out).__name__}, not a tensor")
        if self.cfg.normalize:
            out = torch.nn.functional.normalize(out.float(), dim=-1)
        return out

    def forward(self, model: nn.Module | Callable[..., Any], inputs: Any) -> torch.Tensor:
        """``model`` called on ``inputs``, its output selected."""
        from compress_cli._utils.batches import call

        return self.select(call(model, inputs), inputs)

    # -- scoring and training ------------------------------------------------------------------
    def loss(self, pred: torch.Tensor, target: Any, reference: torch.Tensor | None) -> torch.Tensor:
        """The mean training loss of a batch."""
        raise NotImplementedError

    def evaluator(self) -> Evaluator:
        """A fresh accumulator of the task's metrics."""
        raise NotImplementedError

    def check_output(self, pred: torch.Tensor, target: Any) -> None:
        """Raise SourceError when the model's selected output cannot be scored against ``target``
        (wrong shape, class count); called once on a sample batch before anything runs."""
        if self.needs_labels and target is None:
            raise SourceError(
                f"task {self.name} needs labels but the data has none; use task: fidelity (label-free, "
                "scored against the original model) or set task.target to the batch's label key"
            )

    def option(self, key: str) -> Any:
        """``task.kwargs[key]``, or its default from :attr:`options`."""
        assert self.options is not None and key in self.options
        return self.cfg.kwargs.get(key, self.options[key][0])

    def report_fields(self, scores: dict[str, float]) -> dict[str, Any]:
        """How the evaluator's metrics appear in the report's metrics: the task, its primary metric
        and direction, every metric under ``scores`` and the primary's value as ``score``."""
        values = {k: v for k, v in scores.items() if k != "samples"}
        if self.primary not in values:
            raise StageError(
                f"task.primary: {self.name} measured no {self.primary!r} on this data "
                f"(measured: {', '.join(values)}); choose one of those"
            )
        return {
            "task": self.name,
            "primary": self.primary,
            "higher_is_better": self.higher_is_better,
            "score": values[self.primary],
            "scores": values,
            "samples": int(scores["samples"]),
        }

    def describe(self) -> dict[str, Any]:
        """What the task is, for reports and ``compress tasks``."""
        return {
            "task": self.name,
            "primary": self.primary,
            "higher_is_better": self.higher_is_better,
            "needs_labels": self.needs_labels,
            "needs_reference": self.needs_reference,
        }

    @classmethod
    def info(cls) -> dict[str, Any]:
        """What ``compress tasks`` shows of the task class: its description, metrics (meaning and
        direction), default primary metric, label and reference needs, and ``task.kwargs``."""
        doc = " ".join(line.strip() for line in (cls.__doc__ or "").strip().splitlines()).replace("``", "")
        return {
            "task": cls.name,
            "summary": doc.split(". ")[0].rstrip(".") + "." if doc else "",
            "doc": doc,
            "primary": cls.primary,
            "higher_is_better": cls.higher_is_better,
            "needs_labels": cls.needs_labels,
            "needs_reference": cls.needs_reference,
            "metrics": {m: (meaning, cls.direction(m)) for m, meaning in cls.metrics.items()},
            "options": dict(cls.options or {}),
        }

    def reference_output(self, inputs: Any, key: Any = None) -> torch.Tensor:
        """The original model's selected output on ``inputs`` (cached under ``key`` when given)."""
        if self.reference is None:
            raise StageError(f"task {self.name} needs the original model's outputs but has none attached")
        return self.reference(inputs, key)


def _pick(output: Any, sel: str | int | None, keys: tuple[str, ...]) -> Any:
    """``sel`` (key, attribute or index) of ``output``; with ``sel`` None the output itself when it
    is a tensor, else the first of ``keys`` it has, else its first element."""
    import torch

    if sel is None:
        if isinstance(output, torch.Tensor):
            return output
        if isinstance(output, Mapping):
            for k in keys:
                if output.get(k) is not None:
                    return output[k]
            return next(iter(output.values()))
        if isinstance(output, (tuple, list)):
            return output[0]
        for k in keys:
            if getattr(output, k, None) is not None:
                return getattr(output, k)
        raise StageError(
            f"cannot find a tensor in the model's output ({type(output).__name__}); set task.output"
        )
    if isinstance(sel, int):
        if isinstance(output, (tuple, list)) and -len(output) <= sel < len(output):
            return output[sel]
        raise StageError(
            f"task.output: {sel} is not an index of the model's output ({type(output).__name__})"
        )
    if isinstance(output, Mapping):
        if sel in output:
            return output[sel]
        raise StageError(
            f"task.output: the model's output has no {sel!r} (keys: {', '.join(map(str, output))})"
        )
    if hasattr(output, sel):
        return getattr(output, sel)
    raise StageError(f"task.output: the model's output ({type(output).__name__}) has no {sel!r}")


class Reference:
    """The original (uncompressed) model's selected outputs: computed on demand, cached by key for
    evaluation splits (their loaders are not shuffled) up to ``limit_bytes``.

    ``model`` is a callable returning the original module (it may live in a file until needed)."""

    def __init__(
        self,
        model: Callable[[], nn.Module],
        device: torch.device,
        task: Task,
        limit_bytes: int = 1 << 30,
    ):
        self._model_fn = model
        self._model: nn.Module | None = None
        self.device = device
        self.task = task
        self.limit_bytes = limit_bytes
        self._cache: dict[Any, torch.Tensor] = {}
        self._cached_bytes = 0

    def model(self) -> nn.Module:
        """The original model (loaded once)."""
        if self._model is None:
            self._model = self._model_fn()
        return self._model

    def release(self) -> None:
        """Forget the loaded original model (the cache of outputs stays)."""
        self._model = None

    def __call__(self, inputs: Any, key: Any = None) -> torch.Tensor:
        """The original's selected output on ``inputs`` (float; on the inputs' device)."""
        import torch

        from compress_cli._utils.batches import tensors, to_device

        if key is not None and key in self._cache:
            return self._cache[key]
        where = next(tensors(inputs)).device
        with torch.no_grad():
            out = self.task.forward(self.model(), to_device(inputs, self.device)).float().to(where)
        if key is not None and self._cached_bytes + out.numel() * 4 <= self.limit_bytes:
            self._cache[key] = out
            self._cached_bytes += out.numel() * 4
        return out
