"""torch.distributed plumbing for data parallelism (gloo on CPU, nccl on CUDA).

A plain `recipe-runner train` is one process; under `torchrun` each process is a data-parallel
rank and the policy's forward runs through DistributedDataParallel (`data_parallel` below): its
reducer all-reduces gradient buckets while backward is still running, once per optimizer step
(the loop's other micro-batches accumulate under `no_sync`).
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


class PolicyCall(torch.nn.Module):
    """The policy's whole per-sequence log-prob computation as one module call (decoder body,
    then the chunked LM head that reads the head's weight directly), so that
    DistributedDataParallel sees every parameter used inside its forward."""

    def __init__(self, model: torch.nn.Module, fn):
        super().__init__()
        self.model = model  # registered: DDP finds and synchronises its parameters
        self._fn = fn

    def forward(self, examples):
        return self._fn(examples)


def data_parallel(model: torch.nn.Module, fn, d: Dist, device: torch.device):
    """DDP over PolicyCall(model, fn), or None for one process. Gradients are averaged over
    ranks (so each rank's loss is its own mean); parameters are broadcast from rank 0 at
    construction; gradients live in the communication buckets (no second copy)."""
    if d.world == 1:
        return None
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(PolicyCall(model, fn), device_ids=[device.index] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True)


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
