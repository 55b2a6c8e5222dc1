"""The ``batch_size_find`` stage: the largest (or fastest) training batch that fits (``batch_size: auto``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from compress_cli.config.bounds import MAX_BATCH, LearningRate
from compress_cli.stages.base import Stage, StageConfig, StageResult
from compress_cli.stages.registry import register_stage
from compress_cli.state import State


class BatchSizeFindConfig(StageConfig):
    """Find the training batch size; the result becomes ``batch_size: auto`` for later stages."""

    mode: Literal["max", "throughput"] | None = Field(
        None,
        description="max: largest batch that fits (CUDA memory, or max_memory_gb); throughput: best measured "
        "samples/s; default: max on CUDA or when max_memory_gb is set, else throughput",
    )
    start: int = Field(8, gt=0, le=MAX_BATCH, description="first batch size tried")
    max_batch_size: int = Field(
        8192, gt=0, le=MAX_BATCH, description="never go above this (nor above the training split's size)"
    )
    max_memory_gb: float | None = Field(
        None, gt=0, le=1e6, description="memory bound: CUDA measured peak, CPU estimated training-step memory"
    )
    margin: float = Field(
        0.1, ge=0, lt=1, description="max mode: keep this fraction below the largest fitting batch"
    )
    multiple_of: int = Field(
        8, gt=0, le=MAX_BATCH, description="round the result down to a multiple of this (when at least this)"
    )
    steps: int = Field(3, ge=2, le=100, description="training steps per probe (the first is not timed)")
    throughput_tolerance: float = Field(
        0.05, ge=0, lt=1, description="throughput: smallest batch within this fraction of the best samples/s"
    )
    scale_lr: bool = Field(False, description="scale hparams.lr linearly with the batch-size change")
    base_lr: LearningRate | None = Field(None, description="scale_lr: the lr to scale (default: hparams.lr)")
    optimizer: Literal["sgd", "adam", "adamw"] = Field(
        "adam", description="optimizer of the probes (its state uses memory)"
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    amp: bool = Field(True, description="mixed precision on CUDA (ignored on CPU)")


@register_stage("batch_size_find")
class BatchSizeFind(Stage[BatchSizeFindConfig]):
    """Batch-size search: doubling then binary search (out-of-memory safe), or best throughput.

    Each probe runs a few real training steps at one batch size and restores the model. On CUDA
    a probe fits when it raises no out-of-memory error (and stays under ``max_memory_gb``); on CPU
    the training-step memory is estimated from the tensors autograd saves plus weights, gradients
    and optimizer state. The result (less ``margin`` in max mode) goes to ``hparams["batch_size"]``;
    with ``scale_lr`` the lr is scaled by new batch / previous batch.
    """

    example = {"mode": "max", "max_memory_gb": 0.002, "start": 16, "max_batch_size": 256, "steps": 2}
    provides = frozenset({"batch_size"})

    @classmethod
    def trains(cls, config: StageConfig) -> bool:
        return True  # probes run training steps (then restore the weights)

    @classmethod
    def check(cls, config: StageConfig, device: str, earlier: Sequence[StageConfig] = ()) -> list[str]:
        """``scale_lr`` needs an lr to scale: ``base_lr``, or an earlier stage that finds one."""
        from compress_cli.stages.registry import get_stage

        if not (isinstance(config, BatchSizeFindConfig) and config.scale_lr and config.base_lr is None):
            return []
        if any("lr" in get_stage(c.type).provides or getattr(c, "scale_lr", False) for c in earlier):
            return []
        return ["scale_lr: no lr to scale (run lr_find before this stage or set base_lr)"]

    def preflight(self, state: State) -> None:
        """Max mode on CPU without ``max_memory_gb`` needs this system's available memory."""
        from compress_cli.errors import StageError

        c = self.config
        on_cpu = state.device.type != "cuda"
        if c.mode == "max" and on_cpu and c.max_memory_gb is None and _available_memory() is None:
            raise StageError(
                "mode max on CPU needs max_memory_gb (available memory is unknown on this system)"
            )

    def preview(self, state: State) -> list[str]:
        c = self.config
        n_train = len(state.data.train_dataset)  # type: ignore[arg-type]
        return [
            f"probe batch sizes from {c.start} up to {min(c.max_batch_size, n_train)} "
            f"({c.mode}); sets hparams.batch_size" + (" and scales hparams.lr" if c.scale_lr else "")
        ]

    def run(self, state: State) -> StageResult:
        from compress_cli.errors import StageError
        from compress_cli.runtime import distributed
        from compress_cli.training import TrainOptions
        from compress_cli.tuning import Probe, apply_margin, pick_throughput, probe_batch, search_max_batch

        c = self.config
        cuda = state.device.type == "cuda"
        mode = c.mode
        if mode is None:
            mode = "max" if cuda or c.max_memory_gb is not None else "throughput"
        cap = min(c.max_batch_size, len(state.data.train_dataset))  # type: ignore[arg-type]
        limit = int(c.max_memory_gb * 2**30) if c.max_memory_gb is not None else None
        if mode == "max" and not cuda and limit is None:
            limit = _available_memory()
            if limit is None:
                raise StageError(
                    "mode max on CPU needs max_memory_gb (available memory is unknown on this system)"
                )
        lr = state.hparams.get("lr", 1e-3)
        opts = TrainOptions.model_validate(
            {"epochs": 1, "lr": float(lr), "optimizer": c.optimizer, "momentum": c.momentum, "amp": c.amp}
        )
        probes: dict[int, Probe] = {}

        def fits(bs: int) -> bool:
            if bs not in probes:
                p = probe_batch(state.model, state, opts, bs, c.steps, limit_bytes=limit, label=self.name)
                probes[bs] = p
                state.ctx.listener.on_message(
                    f"{self.name}: batch {bs} " + ("fits" if p.fits else f"does not fit ({p.reason})")
                )
            return probes[bs].fits

        result: tuple[int | None, str, int | None] | None = None
        if distributed.is_main():  # under torchrun rank 0 probes alone (no DDP); the others take its result
            if mode == "max":
                found, how = search_max_batch(fits, c.start, cap)
                final = None if found is None else apply_margin(found, c.margin, c.multiple_of)
                result = (final, how, found)
            else:
                bs = max(1, min(c.start, cap))
                while True:
                    if not fits(bs) or bs >= cap:
                        break
                    bs = min(bs * 2, cap)
                ok = [p for p in probes.values() if p.fits]
                if ok:
                    best = pick_throughput(list(probes.values()), c.throughput_tolerance)
                    result = (
                        best.batch_size,
                        f"best throughput within {c.throughput_tolerance:.0%}",
                        best.batch_size,
                    )
                else:
                    result = (None, "even the start batch does not fit", None)
        final, how, found = distributed.broadcast(result)
        table = [p.as_row() for p in sorted(probes.values(), key=lambda p: p.batch_size)]
        if final is None:
            raise StageError(f"no batch size fits: {how} (probes: {table})")
        previous_bs = int(state.hparams.get("batch_size") or state.data.batch_size)
        state.hparams["batch_size"] = final
        notes = f"batch {final} ({mode}: {how}"
        notes += f", largest fitting {found}, margin {c.margin:.0%})" if mode == "max" else ")"
        details = {
            "batch_size": final,
            "mode": mode,
            "search": how,
            "largest_fitting": found,
            "cap": cap,
            "memory_limit_gb": None if limit is None else round(limit / 2**30, 3),
            "memory": "measured peak (CUDA)"
            if cuda
            else "estimate: saved activations + weights, grads, optimizer state",
            "probes": table,
        }
        if c.scale_lr:
            base = c.base_lr if c.base_lr is not None else state.hparams.get("lr")
            if base is None:
                raise StageError("scale_lr: no lr to scale (run lr_find before this stage or set base_lr)")
            new_lr = float(base) * final / previous_bs
            state.hparams["lr"] = new_lr
            details.update(lr=new_lr, lr_scaled_from=float(base), reference_batch_size=previous_bs)
            notes += f"; lr {float(base):.3g} -> {new_lr:.3g} (x{final}/{previous_bs})"
        state.ctx.listener.on_message(f"{self.name}: {notes}")
        return StageResult(notes=notes, details=details)


def _available_memory() -> int | None:
    """Bytes of memory available to this process now (Linux), or None."""
    import os

    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None
