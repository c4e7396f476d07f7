"""Tensor parallelism over torch.distributed: one process per rank, gloo on CPU, NCCL on CUDA.

Rank 0 runs the engine (scheduler, sampler, request table); every rank holds a shard of the
model and of the KV cache (its heads). Each step, rank 0 broadcasts the step's inputs (token ids,
chunk starts and lengths, block tables: metadata, a few KB) and every rank runs its shard; the
shards meet in all-reduces (after the attention output and the MLP down projections) and in the
gather of the vocabulary-parallel logits.

On one host the executor starts ranks 1..N-1 itself; under ``torchrun`` every rank is started
by torchrun and finds the others through its rendezvous (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``).
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Parallel:
    """Where this process sits among the tensor-parallel ranks (``world`` 1: alone)."""

    rank: int = 0
    world: int = 1

    @property
    def is_first(self) -> bool:
        """Whether this rank runs the engine."""
        return self.rank == 0

    def shard(self, n: int, what: str = "dimension") -> slice:
        """This rank's equal part of ``range(n)``; ``n`` must divide evenly."""
        if n % self.world:
            raise ValueError(f"{what} of {n} does not split evenly over {self.world} ranks")
        size = n // self.world
        return slice(self.rank * size, (self.rank + 1) * size)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place (nothing to do alone)."""
        if self.world > 1:
            dist.all_reduce(x)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' ``x`` side by side along the last dimension (vocabulary-parallel logits)."""
        if self.world == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank (pickled: for small metadata, not tensors of data)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


SINGLE = Parallel()


def torchrun_world() -> tuple[int, int] | None:
    """(rank, world size) when torchrun (or another launcher) set up this process, else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def init(
    rank: int, world: int, init_method: str, device: torch.device, timeout_s: float
) -> Parallel:
    """Join the process group (gloo on CPU, NCCL on CUDA); returns this rank's Parallel."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )  # fmt: skip
    return Parallel(rank=rank, world=world)


def free_port() -> int:
    """A free TCP port on loopback (for a one-host rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def threads_per_rank(world: int) -> int:
    """CPU threads each of ``world`` ranks on this host gets (their share of the cores)."""
    return max(1, (os.cpu_count() or 1) // world)
