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
    if not spec.num_experts and spec.intermediate_size % n:
        raise ValueError(
            f"engine.tensor_parallel={n} does not divide the model's MLP width of "
            f"{spec.intermediate_size}"
        )
    if spec.num_experts % n:
        raise ValueError(
            f"engine.tensor_parallel={n} does not divide the model's {spec.num_experts} experts"
        )
    here = ranks_here(n)
    have = torch.cuda.device_count() if where == "cuda" else (os.cpu_count() or 1)
    if here > have:
        raise ValueError(
            f"engine.tensor_parallel={n} puts {here} ranks on this host, but this host has "
            f"{have} {'GPUs' if where == 'cuda' else 'cores'}"
        )


def ranks_here(n: int) -> int:
    """How many of the ``n`` ranks run on this host (torchrun's local world, else all)."""
    launch = par.torchrun_world()
    return launch.local_world if launch is not None else n


def join(n: int, ctx: ExecutorContext) -> tuple[Parallel, list[subprocess.Popen], torch.device]:
    """This process's place among ``n`` ranks (torchrun's; or rank 0, starting ranks 1..n-1
    here), the ranks it started, and its device (its own GPU on CUDA)."""
    par.check_free()
    launch = par.torchrun_world()
    if launch is not None:
        if launch.world != n:
            raise ValueError(
                f"engine.tensor_parallel={n}, but torchrun started {launch.world} ranks"
            )
        device = par.rank_device(ctx.device, launch.local_rank)
        parallel = par.init(launch.rank, n, "env://", device, ctx.tp_timeout_s)
        atexit.register(stop, parallel, [])
        return parallel, [], device
    device = par.rank_device(ctx.device, 0)
    init_method = f"tcp://127.0.0.1:{par.free_port()}"
    context = _write_context(ctx)
    command = [sys.executable, "-m", "modgen.plugins.executors.ranks", str(context)]
    workers = [
        subprocess.Popen([*command, "--rank", str(r), "--world", str(n), "--init", init_method])
        for r in range(1, n)
    ]
    try:
        parallel = par.init(0, n, init_method, device, ctx.tp_timeout_s)
    except BaseException:
        _end(workers, at_once=True)
        raise
    finally:  # every rank read it before joining
        shutil.rmtree(context.parent, ignore_errors=True)
    atexit.register(stop, parallel, workers)
    return parallel, workers, device


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


def stop(parallel: Parallel, workers: list[subprocess.Popen], broken: bool = False) -> None:
    """At close or exit (once): tell the other ranks to stop (they end their loops), end those
    started here that are still there, and leave the process group (so this process may start
    another tensor-parallel engine). ``broken`` (the ranks are out of step, or never got in
    step): end the started ranks at once instead."""
    if not dist.is_initialized():
        return
    atexit.unregister(stop)
    if not broken and parallel.is_first and all(p.poll() is None for p in workers):
        sender = threading.Thread(target=_send_stop, args=(parallel,), daemon=True)
        sender.start()
        sender.join(timeout=10)
        broken = sender.is_alive()
    _end(workers, at_once=broken)
    dist.destroy_process_group()


def _end(workers: list[subprocess.Popen], at_once: bool) -> None:
    """Wait for the started ranks to end (up to 10 s each; at once: none), killing the rest."""
    for proc in workers:
        try:
            proc.wait(timeout=0.1 if at_once else 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
    device = par.rank_device(torch.device(data.device), a.rank)  # rank r of one host
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
