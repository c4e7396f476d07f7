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
import threading
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
    ``gather``), waiting for slower ranks included. With gloo (CPU) the collectives are
    synchronous; with NCCL these are the times to enqueue them, not to run them."""
    calls: dict[str, int] = field(default_factory=dict)

    def _timed(self, what: str, t0: float) -> None:
        self.seconds[what] = self.seconds.get(what, 0.0) + time.perf_counter() - t0
        self.calls[what] = self.calls.get(what, 0) + 1

    @property
    def is_first(self) -> bool:
        """Whether this rank runs the engine."""
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place (nothing to do alone)."""
        if self.world > 1:
            t0 = time.perf_counter()
            dist.all_reduce(x)
            self._timed("all_reduce", t0)
        return x

    def gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """On rank 0, the ranks' ``x`` side by side along the last dimension (vocabulary-
        parallel logits, which only rank 0 samples); ``x`` itself on the others."""
        if self.world == 1:
            return x
        t0 = time.perf_counter()
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)] if self.is_first else None
        dist.gather(x, parts, dst=0)
        self._timed("gather", t0)
        return torch.cat(parts, dim=-1) if parts is not None else x

    def broadcast(self, obj: Any = None, timed: bool = True) -> Any:
        """Rank 0's ``obj`` on every rank (pickled: for small metadata, not tensors of data)."""
        if self.world == 1:
            return obj
        t0 = time.perf_counter()
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        if timed:
            self._timed("broadcast", t0)
        return box[0]


SINGLE = Parallel()


@dataclass(frozen=True)
class Launch:
    """Where a launcher (torchrun) placed this process: global rank and size, and its place
    among the ranks of this host."""

    rank: int
    world: int
    local_rank: int
    local_world: int


def torchrun_world() -> Launch | None:
    """This process's place when torchrun (or another launcher) set it up, else None."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env and "MASTER_ADDR" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
        return Launch(rank, world, local, int(env.get("LOCAL_WORLD_SIZE", world)))
    return None


def check_free() -> None:
    """Refuse to start ranks while this process is already in a process group."""
    if dist.is_initialized():
        raise RuntimeError(
            "this process already holds a tensor-parallel process group: another engine with "
            "engine.tensor_parallel > 1 is open here; close it first (LLM.close(), Engine.close())"
        )


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """The device of the rank with index ``local_rank`` on its host: its own GPU (made the
    current one, as NCCL needs) on CUDA, the CPU otherwise."""
    if device.type != "cuda":
        return device
    gpu = torch.device("cuda", local_rank)
    torch.cuda.set_device(gpu)
    return gpu


def init(
    rank: int, world: int, init_method: str, device: torch.device, timeout_s: float
) -> Parallel:
    """Join the process group (gloo on CPU, NCCL on CUDA); returns this rank's Parallel.
    ``device`` is this rank's (see ``rank_device``). Every collective, the wait of ranks
    other than 0 for the next step included, times out after ``timeout_s``: rank 0 keeps
    them waiting no longer (see ``Heartbeat``)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    check_free()
    # torch.distributed.nn.functional binds ``group.WORLD`` as default arguments when it is
    # imported. Imported while the group is live (transformers' FSDP glue does, on the first
    # config it reads) it keeps the group, and its gloo threads, alive past
    # destroy_process_group; a collective's last reference then dies in a gloo thread while
    # the interpreter finalizes, which aborts the process at exit. Imported now, it binds None.
    import torch.distributed.nn.functional  # noqa: F401

    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )  # fmt: skip
    return Parallel(rank=rank, world=world)


class Heartbeat:
    """Rank 0's side of an idle engine: ranks other than 0 wait for the next step inside a
    collective, which times out; while no step runs, a thread broadcasts ``("noop", None)``
    every ``interval_s`` so that they never wait that long. Rank 0 runs each step's
    collectives inside ``with heartbeat:`` (one thread's collectives at a time)."""

    def __init__(self, parallel: Parallel, interval_s: float, device: torch.device) -> None:
        self.parallel, self.interval_s, self.device = parallel, interval_s, device
        self.lock = threading.Lock()
        self.last = time.monotonic()
        self.failed: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tp-heartbeat", daemon=True)
        self._thread.start()

    def __enter__(self) -> Heartbeat:
        self.lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.last = time.monotonic()
        self.lock.release()

    def _run(self) -> None:
        if self.device.type == "cuda":  # NCCL stages objects on the thread's current GPU
            torch.cuda.set_device(self.device)
        while not self._stop.wait(self.interval_s / 4):
            with self.lock:
                if self._stop.is_set() or time.monotonic() - self.last < self.interval_s:
                    continue
                try:
                    self.parallel.broadcast(("noop", None), timed=False)
                except Exception as exc:  # a rank gone or hung: the next step says so
                    self.failed = exc
                    return
                self.last = time.monotonic()

    def stop(self) -> None:
        """No more heartbeats (before the ranks are told to stop)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval_s + 1)


def free_port() -> int:
    """A free TCP port on loopback (for a one-host rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def threads_per_rank(world: int) -> int:
    """CPU threads each of ``world`` ranks on this host gets (their share of the cores)."""
    return max(1, (os.cpu_count() or 1) // world)
