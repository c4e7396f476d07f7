"""Replica processes: start, watch, restart, stop; and the least-outstanding-work choice.

Each local replica is ``python -m modgen.serve.worker`` on the same saved root config, listening
on a free loopback port that it reports through a file. A replica that exits is noticed at once
(its process is awaited); one that stops answering its health check ``health_failures`` times in
a row is killed. Either way its open connections close, so requests in flight on it fail at once
rather than hang, and a new process takes its place.

Remote replicas (``serve.replica_urls``: servers on other hosts, started there) are health-checked
the same way: one that fails ``health_failures`` checks in a row takes no more requests until a
check passes again (the balancer cannot restart what it did not start).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from modgen.serve.task import ServeTask

log = logging.getLogger(__name__)


@dataclass
class Replica:
    """One engine process and the balancer's bookkeeping of it."""

    index: int
    remote: str | None = None
    """Base URL of a replica on another host (None: a local process the pool manages)."""
    process: asyncio.subprocess.Process | None = None
    port: int | None = None
    healthy: bool = False
    outstanding: int = 0
    """Work units (choices) of requests sent to it and not yet answered."""
    routed: int = 0
    restarts: int = 0
    failures: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        """Base URL of the replica."""
        return self.remote or f"http://127.0.0.1:{self.port}"

    def status(self) -> dict[str, Any]:
        """A JSON-able summary."""
        pid = self.process.pid if self.process is not None else None
        keys = ("index", "url", "remote", "healthy", "outstanding", "routed", "restarts")
        return {"pid": pid, **{k: getattr(self, k) for k in keys}, "events": self.events}


class ReplicaPool:
    """N replicas of one engine config; ``pick`` chooses where a request goes."""

    def __init__(self, config_path: Path, cfg: ServeTask.Config, workdir: Path) -> None:
        self.config_path, self.cfg, self.workdir = config_path, cfg, workdir
        self.replicas = [Replica(i) for i in range(cfg.replicas)]
        self.replicas += [
            Replica(cfg.replicas + j, remote=url.rstrip("/"))
            for j, url in enumerate(cfg.replica_urls)
        ]
        self.closing = False
        self._tasks: set[asyncio.Task] = set()
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(5.0))

    # choosing ---------------------------------------------------------------------------------

    def pick(self, exclude: Collection[int] = ()) -> Replica | None:
        """The healthy replica with the least outstanding work (then the fewest requests routed
        so far); None if none is healthy."""
        ready = [r for r in self.replicas if r.healthy and r.index not in exclude]
        return min(ready, key=lambda r: (r.outstanding, r.routed, r.index), default=None)

    @property
    def num_healthy(self) -> int:
        """Replicas taking requests."""
        return sum(r.healthy for r in self.replicas)

    # lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every local replica and wait until all are ready (if one cannot start, stop
        them all and raise); check the remote ones once (those down take requests once a later
        check passes)."""
        try:
            await asyncio.gather(*(self._launch(r) for r in self.replicas if r.remote is None))
        except BaseException:
            await self.stop()
            raise
        for rep in self.replicas:
            if rep.remote is not None:
                rep.healthy = await self._answers(rep)
                log.info("replica %d: %s is %s", rep.index, rep.url,
                         "up" if rep.healthy else "not answering yet")  # fmt: skip
        self._spawn(self._monitor())

    async def _launch(self, rep: Replica) -> None:
        port_file = self.workdir / f"replica{rep.index}.port"
        port_file.unlink(missing_ok=True)
        started = time.monotonic()
        rep.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "modgen.serve.worker", str(self.config_path),
            "--port-file", str(port_file), "--index", str(rep.index),
        )  # fmt: skip
        log.info("replica %d: started process %d", rep.index, rep.process.pid)
        deadline = started + self.cfg.replica_start_timeout_s
        while not await self._ready(rep, port_file):
            if rep.process.returncode is not None or time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    rep.process.kill()
                raise RuntimeError(
                    f"replica {rep.index} did not start (exit {rep.process.returncode})"
                )
            await asyncio.sleep(0.1)
        rep.healthy, rep.failures = True, 0
        log.info(
            "replica %d: ready on %s after %.1f s", rep.index, rep.url, time.monotonic() - started
        )
        self._spawn(self._watch(rep, rep.process))

    async def _ready(self, rep: Replica, port_file: Path) -> bool:
        if rep.port is None:
            if not port_file.exists():
                return False
            rep.port = int(port_file.read_text())
        try:
            return (await self._http.get(f"{rep.url}/health")).status_code == 200
        except httpx.HTTPError:
            return False

    async def _watch(self, rep: Replica, process: asyncio.subprocess.Process) -> None:
        """Notice the moment ``process`` exits; restart it unless the pool is closing."""
        code = await process.wait()
        if self.closing or rep.process is not process:
            return
        noticed = time.time()
        rep.healthy = False
        log.error("replica %d: process %d exited with %s; restarting", rep.index, process.pid, code)
        event: dict[str, Any] = {"exit_code": code, "noticed_at": noticed}
        rep.events.append(event)
        delay = 0.5
        while not self.closing:
            rep.port = None
            try:
                await self._launch(rep)
            except (RuntimeError, OSError) as exc:
                log.error(
                    "replica %d: restart failed (%s); retrying in %.0f s", rep.index, exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            rep.restarts += 1
            event["ready_at"] = time.time()
            event["restart_s"] = event["ready_at"] - noticed
            return

    async def _monitor(self) -> None:
        """Health-check the live replicas (and every remote one); kill a local one that fails
        too often (``_watch`` restarts it), take a remote one out until it answers again."""
        while not self.closing:
            await asyncio.sleep(self.cfg.health_interval_s)
            if not self.closing:
                await asyncio.gather(
                    *(self._check(r) for r in self.replicas if r.healthy or r.remote)
                )

    async def _answers(self, rep: Replica) -> bool:
        try:
            return (await self._http.get(f"{rep.url}/health")).status_code == 200
        except httpx.HTTPError:
            return False

    async def _check(self, rep: Replica) -> None:
        ok = await self._answers(rep)
        rep.failures = 0 if ok else rep.failures + 1
        if rep.remote is not None:
            if ok and not rep.healthy:
                log.info("replica %d: %s answers again", rep.index, rep.url)
                rep.healthy = True
            elif rep.failures >= self.cfg.health_failures and rep.healthy:
                log.error("replica %d: %s failed %d health checks; taking it out", rep.index,
                          rep.url, rep.failures)  # fmt: skip
                rep.healthy = False
            return
        if rep.failures >= self.cfg.health_failures and rep.process is not None:
            log.error("replica %d: %d failed health checks; killing it", rep.index, rep.failures)
            rep.healthy = False
            with contextlib.suppress(ProcessLookupError):
                rep.process.kill()

    def begin_shutdown(self) -> None:
        """Stop restarting, and ask every replica to drain (SIGTERM: each finishes or aborts its
        requests within the grace period)."""
        self.closing = True
        for rep in self.replicas:
            rep.healthy = False
            if rep.process is not None and rep.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    rep.process.send_signal(signal.SIGTERM)

    async def stop(self) -> None:
        """Drain and end every replica (killing what outlives the grace period)."""
        self.begin_shutdown()
        wait = self.cfg.grace_period_s + 10.0
        procs = [r.process for r in self.replicas if r.process is not None]
        done = await asyncio.gather(
            *(asyncio.wait_for(p.wait(), wait) for p in procs), return_exceptions=True
        )
        for proc, res in zip(procs, done, strict=True):
            if isinstance(res, BaseException):
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for task in self._tasks:
            task.cancel()
        await self._http.aclose()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
