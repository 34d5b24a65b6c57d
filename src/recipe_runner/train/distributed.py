"""torch.distributed plumbing for data parallelism (gloo on CPU, nccl on CUDA).

A plain `recipe-runner train` is one process; under `torchrun` each process is a data-parallel
rank. Gradients are averaged with DistributedDataParallel-free all-reduces after accumulation,
which keeps the accumulate-then-step loop identical in both cases.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local)
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local)


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def average_gradients(params, d: Dist) -> None:
    """Mean of the ranks' gradients: each rank's loss is already scaled by its share of the
    global batch, so the SUM over ranks is the global-batch mean."""
    if d.world == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def broadcast_object(obj, d: Dist):
    if d.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(d: Dist) -> None:
    """Tear down together: a rank that leaves while another still talks to it over gloo can
    abort ("terminate called without an active exception") and fail the torchrun job."""
    if d.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
