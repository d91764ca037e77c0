"""Process groups for DistributedDataParallel: set up from torchrun's environment or by hand."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, logs and progress."""
        return self.rank == 0


def setup(device_type: str, *, rank: int | None = None, world_size: int | None = None,
          init_method: str | None = None) -> DistInfo:
    """Join the process group, if there is one.

    With `rank`/`world_size` given (e.g. from torch.multiprocessing with a file:// init_method)
    those are used; otherwise torchrun's RANK, WORLD_SIZE and LOCAL_RANK. The backend is NCCL
    for CUDA and gloo for the CPU. A world of one process creates no group.
    """
    if rank is None:
        rank = int(os.environ.get("RANK", 0))
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    else:
        world_size = 1 if world_size is None else world_size
        local_rank = rank
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    info = DistInfo(rank, world_size, local_rank)
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, init_method=init_method or "env://", rank=rank,
                                world_size=world_size)
    return info


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The sum of `t` over all processes (in place); `t` itself in a single process."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(value, info: DistInfo):
    """Rank 0's `value` on every process (any picklable object)."""
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(value, info: DistInfo) -> list:
    """Every process's `value`, in rank order, on every process."""
    if not info.enabled:
        return [value]
    values = [None] * info.world_size
    dist.all_gather_object(values, value)
    return values
