"""The ranks of a tensor-parallel ``executor=model``: checks at start, joining (or starting)
them, noticing one that died, and stopping them. Run as a module it is one rank of N:

    python -m modgen.plugins.executors.ranks CONTEXT.yaml --rank R --world N --init tcp://...
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from modgen import registry
from modgen.engine import parallel as par
from modgen.engine.executor import ExecutorContext
from modgen.engine.parallel import Parallel
from modgen.model import describe_model

log = logging.getLogger(__name__)
threads_per_rank = par.threads_per_rank


def check(n: int, ctx: ExecutorContext) -> None:
    """Refuse, with the numbers, a split the model or the machine cannot take."""
    spec, where = ctx.spec, ctx.device.type
    model_cls = registry.get("model", ctx.model["name"])
    if not model_cls.supports_tensor_parallel:
        raise ValueError(f"model '{model_cls.registry_name}' cannot be split over ranks")
    if spec.num_heads % n:
        raise ValueError(
            f"engine.tensor_parallel={n} does not divide the model's {spec.num_heads} query heads"
        )
    if spec.num_kv_heads % n and n % spec.num_kv_heads:
        raise ValueError(
            f"engine.tensor_parallel={n} neither divides nor is a multiple of the model's "
            f"{spec.num_kv_heads} KV heads"
        )
    have = torch.cuda.device_count() if where == "cuda" else (os.cpu_count() or 1)
    if n > have:
        raise ValueError(
            f"engine.tensor_parallel={n} ranks, but this host has {have} "
            f"{'GPUs' if where == 'cuda' else 'cores'}"
        )


def join(n: int, ctx: ExecutorContext) -> tuple[Parallel, list[subprocess.Popen]]:
    """Rank 0's place among ``n`` ranks: torchrun's, or ranks 1..n-1 started here."""
    env = par.torchrun_world()
    if env is not None:
        rank, world = env
        if world != n:
            raise ValueError(f"engine.tensor_parallel={n}, but torchrun started {world} ranks")
        parallel = par.init(rank, world, "env://", _device(ctx.device, rank), ctx.tp_timeout_s)
        atexit.register(stop, parallel, [])
        return parallel, []
    init_method = f"tcp://127.0.0.1:{par.free_port()}"
    context = _write_context(ctx)
    command = [sys.executable, "-m", "modgen.plugins.executors.ranks", str(context)]
    workers = [
        subprocess.Popen([*command, "--rank", str(r), "--world", str(n), "--init", init_method])
        for r in range(1, n)
    ]
    try:
        parallel = par.init(0, n, init_method, ctx.device, ctx.tp_timeout_s)
    finally:  # every rank read it before joining
        shutil.rmtree(context.parent, ignore_errors=True)
    atexit.register(stop, parallel, workers)
    return parallel, workers


def check_alive(workers: list[subprocess.Popen]) -> None:
    """Raise, naming the rank, if a started rank has exited (its peers would wait in vain)."""
    for rank, proc in enumerate(workers, start=1):
        if proc.poll() is not None:
            raise RuntimeError(
                f"tensor-parallel rank {rank} (process {proc.pid}) exited with {proc.returncode}"
            )


def _send_stop(parallel: Parallel) -> None:
    try:
        parallel.broadcast(("stop", None))
    except Exception as exc:  # a rank that hung past the timeout: it is killed below
        log.warning("could not tell the ranks to stop: %s", exc)


def stop(parallel: Parallel, workers: list[subprocess.Popen]) -> None:
    """At close or exit (once): tell the other ranks to stop (they end their loops), end those
    started here that are still there, and leave the process group (so this process may start
    another tensor-parallel engine)."""
    if not dist.is_initialized():
        return
    atexit.unregister(stop)
    if parallel.is_first and all(p.poll() is None for p in workers):
        sender = threading.Thread(target=_send_stop, args=(parallel,), daemon=True)
        sender.start()
        sender.join(timeout=10)
    for proc in workers:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    dist.destroy_process_group()


def _device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else device


def _write_context(ctx: ExecutorContext) -> Path:
    """What the other ranks build their shards from (no root config: the executor's parts)."""
    data = {
        "model": OmegaConf.to_container(OmegaConf.create(ctx.model), resolve=True),
        "attention": OmegaConf.to_container(OmegaConf.create(ctx.attention), resolve=True),
        "num_blocks": ctx.kv.num_blocks, "block_size": ctx.kv.block_size,
        "device": ctx.device.type, "seed": ctx.seed, "tp_timeout_s": ctx.tp_timeout_s,
    }  # fmt: skip
    path = Path(tempfile.mkdtemp(prefix="modgen-tp-")) / "context.yaml"
    OmegaConf.save(OmegaConf.create(data), path)
    return path


def main(argv: list[str] | None = None) -> None:
    """One rank started by rank 0: join, build this rank's shard, serve steps until told to
    stop."""
    p = argparse.ArgumentParser(prog="python -m modgen.plugins.executors.ranks")
    p.add_argument("context", type=Path)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--init", required=True)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"[rank {a.rank}] %(levelname)s %(message)s")
    data = OmegaConf.load(a.context)
    device = _device(torch.device(data.device), a.rank)
    if device.type == "cpu":
        torch.set_num_threads(threads_per_rank(a.world))
    parallel = par.init(a.rank, a.world, a.init, device, data.tp_timeout_s)
    kv_node = {"name": "blocked", "block_size": data.block_size, "num_blocks": data.num_blocks}
    kv = registry.build("kv_allocator", kv_node, data.num_blocks)
    ctx = ExecutorContext(
        spec=describe_model(data.model), kv=kv, model=data.model, attention=data.attention,
        cost_model=None, device=device, seed=data.seed, tensor_parallel=a.world,
        parallel=parallel, tp_timeout_s=data.tp_timeout_s,
    )  # fmt: skip
    executor: Any = registry.build("executor", {"name": "model"}, ctx)
    executor.serve_steps()
    log.info("stopped")


if __name__ == "__main__":
    main(sys.argv[1:])
