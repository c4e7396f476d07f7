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
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Parallel:
    """Where this process sits among the tensor-parallel ranks (``world`` 1: alone)."""

    rank: int = 0
    world: int = 1
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time this rank spent in each collective (``broadcast``, ``all_reduce``,
    ``all_gather``), waiting for slower ranks included."""
    calls: dict[str, int] = field(default_factory=dict)

    def _timed(self, what: str, t0: float) -> None:
        self.seconds[what] = self.seconds.get(what, 0.0) + time.perf_counter() - t0
        self.calls[what] = self.calls.get(what, 0) + 1

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
            t0 = time.perf_counter()
            dist.all_reduce(x)
            self._timed("all_reduce", t0)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' ``x`` side by side along the last dimension (vocabulary-parallel logits)."""
        if self.world == 1:
            return x
        t0 = time.perf_counter()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        self._timed("all_gather", t0)
        return torch.cat(parts, dim=-1)

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank (pickled: for small metadata, not tensors of data)."""
        if self.world == 1:
            return obj
        t0 = time.perf_counter()
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        self._timed("broadcast", t0)
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
    if dist.is_initialized():
        raise RuntimeError(
            "this process already holds a tensor-parallel process group: another engine with "
            "engine.tensor_parallel > 1 is open here; close it first (LLM.close(), Engine.close())"
        )
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
