"""Merging across processes: ``torchrun --nproc_per_node N epimer merge CONFIG -o OUT``.

Each rank owns a share of the tensors (`partition`: balanced by bytes read), streams only
those, and writes them into its own shards of the output; rank 0 writes the index, the
metadata files and renames the folder into place. Global passes (TIES' threshold, Fisher
norms, ``scale: auto``) reduce their per-rank partial results through `Group`: integer
histograms are summed, and float sums are gathered per tensor and added with `math.fsum`,
which is exact and so independent of order. The merged tensors are therefore bitwise those
of a single-process merge run with the same number of torch threads per process (torch's
own float reductions, e.g. inside an SVD, may round differently with another thread count).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Group:
    """This process's place among the processes torchrun started (one process: rank 0 of 1),
    and the device its collectives run on (``cuda:LOCAL_RANK`` with NCCL, else the CPU with
    gloo)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of ``t`` over every process (use integer tensors for exactness)."""
        if not self.active:
            return t
        import torch.distributed as dist

        out = t.to(self.device, copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(t.device)

    def all_gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` (picklable), in rank order."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()


SINGLE = Group()


def exact_sum(values: Sequence[float]) -> float:
    """Correctly rounded sum (`math.fsum`): the same whatever the order or split of ``values``."""
    return math.fsum(values)


def partition(sizes: Sequence[int], world_size: int) -> list[int]:
    """Owner rank of each item, balancing the total size per rank.

    Largest first, each to the least loaded rank (ties: the lower rank); deterministic, so
    every process computes the same assignment without communicating.
    """
    load = [0] * world_size
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


def init_from_env(cuda: bool = False) -> Group:
    """The process group torchrun describes in the environment (``WORLD_SIZE`` > 1), or
    `SINGLE`. Merging is CPU work and uses gloo; ``cuda`` (Fisher estimation on GPUs) puts
    each process on ``cuda:LOCAL_RANK`` with NCCL when CUDA is available."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = cuda and torch.cuda.is_available()
    if world_size <= 1:
        return Group(device=torch.device("cuda" if use_cuda else "cpu"))
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    return Group(dist.get_rank(), dist.get_world_size(), device)


def shutdown(group: Group) -> None:
    """Leave the process group (callers meet at `Group.barrier` first on success: a gloo rank
    that destroys its group while a peer still works can abort at exit)."""
    if group.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
