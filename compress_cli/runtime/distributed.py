"""Running under ``torchrun``: process-group setup from the environment, rank helpers, reductions.

``torchrun --nproc_per_node N -m compress_cli run recipe.yaml`` starts N copies of the CLI with
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` set. The pipeline calls
:func:`setup` once; from then on ``training.train`` wraps the model in DistributedDataParallel,
shards the training split with a DistributedSampler and reduces its metrics across ranks, and only
rank 0 writes files. A single process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) is unchanged: every
helper here is then a no-op.

``batch_size`` in a recipe is the per-process batch (PyTorch's convention): N processes with
``batch_size: 32`` see 32 x N samples per optimizer step.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun set it (1 when unset or not a number); read before :func:`setup`."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def env_rank() -> int:
    """``RANK`` as torchrun set it (0 when unset or not a number)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def active() -> bool:
    """True when a process group with more than one process is initialised."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the process group; before :func:`setup`, ``RANK`` from the environment."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return env_rank()


def world_size() -> int:
    """The number of processes in the process group (1 while none is initialised)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one process that writes files and prints."""
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Initialise the process group when launched by torchrun; returns the device for this rank.

    NCCL on CUDA (each rank takes ``cuda:LOCAL_RANK``), Gloo otherwise. Without ``WORLD_SIZE > 1``
    nothing happens and ``device`` is returned as is.
    """
    import torch
    import torch.distributed as dist

    from compress_cli.errors import UsageError

    if env_world_size() <= 1:
        return device
    if not dist.is_available():
        raise UsageError("torchrun: this torch build has no torch.distributed support")
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise UsageError(
                f"torchrun: LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s); "
                "lower --nproc_per_node"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend=backend)
        except Exception as e:  # rendezvous problems: wrong address, port in use, peers missing
            raise UsageError(f"torchrun: could not join the process group ({backend}): {e}") from None
        atexit.register(_teardown)
    return device


def _teardown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):  # best effort at exit
            dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here (a no-op in a single process)."""
    if active():
        import torch.distributed as dist

        dist.barrier()


def _reduce_device() -> torch.device:
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks (identity in a single process)."""
    if not active():
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.cpu()]


def all_reduce_tensor_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (a copy; identity in a single process)."""
    if not active():
        return t
    import torch.distributed as dist

    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def any_rank(flag: bool) -> bool:
    """True if ``flag`` is true on any rank (so every rank takes the same branch)."""
    if not active():
        return flag
    return all_reduce_sum([1.0 if flag else 0.0])[0] > 0


def broadcast(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it, on every rank (picklable objects)."""
    if not active():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_reduce_device())
    return box[0]


def train_sampler(dataset: Any, seed: int) -> Any:
    """A DistributedSampler over ``dataset`` for this rank (shuffled; padded so ranks step equally)."""
    from torch.utils.data.distributed import DistributedSampler

    return DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed)


def shard(dataset: Any) -> Any:
    """This rank's interleaved share of ``dataset`` without padding (for exact reduced metrics)."""
    from torch.utils.data import Subset

    return Subset(dataset, list(range(rank(), len(dataset), world_size())))


def wrap_ddp(model: Any, device: torch.device) -> Any:
    """``model`` in DistributedDataParallel, on this rank's CUDA device when ``device`` is CUDA."""
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        return DistributedDataParallel(model, device_ids=[device.index], output_device=device.index)
    return DistributedDataParallel(model)
