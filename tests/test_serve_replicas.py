"""``task=serve serve.replicas=2`` as users start it: two engine processes behind the balancer.
Work goes to the replica with the least outstanding work; a killed replica fails its in-flight
streams at once (no client hangs), its requests that had no answer yet are retried on the other
replica, and it is restarted; SIGTERM drains and exits cleanly."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import httpx
import pytest
from checkpoints import make_checkpoint
from serve_utils import metric, wait_for

LONG = {"model": "mistral", "prompt": [5, 6, 7], "max_tokens": 3000, "temperature": 0,
        "ignore_eos": True}  # fmt: skip
SHORT = {**LONG, "max_tokens": 4}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def balancer(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replicas")
    ckpt = make_checkpoint(tmp / "ckpt", "mistral", max_position_embeddings=4096)  # long streams
    port = free_port()
    log = open(tmp / "server.log", "w")  # noqa: SIM115
    args = [
        "task=serve", "serve.replicas=2", f"serve.port={port}", "model=mistral",
        f"model.checkpoint={ckpt}", "+scheduler=splitfuse", "serve.health_interval_s=0.25",
        "serve.grace_period_s=5", f"hydra.run.dir={tmp / 'run'}",
    ]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "modgen", *args], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/health").json().get("replicas_up") == 2
        except (httpx.HTTPError, ValueError):
            assert proc.poll() is None, (tmp / "server.log").read_text()
            return False

    try:
        wait_for(up, timeout=180, interval=0.25)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
        print((tmp / "server.log").read_text()[-3000:])


def replicas(url: str) -> list[dict]:
    return httpx.get(f"{url}/replicas").json()["replicas"]


def test_least_work_spread_failover_restart_and_sigterm(balancer):
    url, proc = balancer
    api = f"{url}/v1/completions"
    figures: dict[str, object] = {}
    with httpx.Client(timeout=60) as http:
        # 1. least outstanding work, not round-robin: while one replica holds a long stream,
        #    every short request goes to the other one
        with http.stream("POST", api, json={**LONG, "stream": True}) as held:
            busy = held.headers["x-modgen-replica"]
            held_lines = held.iter_lines()  # (a dropped iterator would close the stream)
            assert next(held_lines).startswith("data: {")
            routed = [http.post(api, json=SHORT).headers["x-modgen-replica"] for _ in range(4)]
        assert routed == [str(1 - int(busy))] * 4
        figures[f"while replica {busy} is busy, 4 short requests went to"] = routed

        # 2. concurrent load spreads over both replicas
        spread = asyncio.run(_concurrent(api, [{**SHORT, "max_tokens": 30}] * 8))
        counts = Counter(h for h, _ in spread)
        assert all(status == 200 for _, status in spread)
        assert set(counts) == {"0", "1"} and min(counts.values()) >= 2
        figures["8 concurrent requests per replica"] = dict(counts)

    # 3. kill a replica while requests run on both: its streams fail fast, its requests with
    #    no answer yet (not streamed: the answer comes whole at the end) go to the other one
    before = httpx.get(f"{url}/metrics").text
    run = asyncio.run(_kill_during_load(url, api))
    victim, kill_wall = run["victim"], run["kill_wall"]
    lb = httpx.get(f"{url}/metrics").text

    def grew(name: str) -> float:
        label = f'replica="{victim}"'
        return metric(lb, name, label) - metric(before, name, label)

    on_victim, retried = grew("modgen_lb_requests_total"), grew("modgen_lb_retries_total")
    failed = [r for r in run["ended"] if r["error"] is not None]
    assert failed and len(failed) + retried == on_victim  # every request on it failed or moved
    assert all(r["replica"] == victim and r["error"] == "replica_failed" for r in failed)
    assert all(r["kind"] == "stream" for r in failed)  # the others were retried
    assert max(r["after_kill_s"] for r in failed) < 3.0  # ... at once, none hangs
    assert metric(lb, "modgen_lb_replica_failures_total", f'replica="{victim}"') == len(failed)
    survivors = [r for r in run["ended"] if r["error"] is None]
    assert len(survivors) + run["still_running"] == 6 - len(failed)
    assert all(r["events_after_kill"] > 0 for r in survivors)  # the other replica went on
    figures["streams failed on the killed replica / requests retried on the other"] = (
        len(failed),
        int(retried),
    )
    figures["slowest error after the kill (s)"] = round(max(r["after_kill_s"] for r in failed), 3)

    # 4. it is noticed and restarted
    rep = wait_for(lambda: _restarted(url, victim), timeout=120, interval=0.25)
    event = rep["events"][0]
    figures["noticed after (s)"] = round(event["noticed_at"] - kill_wall, 3)
    figures["restarted and healthy after (s)"] = round(event["ready_at"] - kill_wall, 3)
    assert event["noticed_at"] - kill_wall < 1.0
    lb = httpx.get(f"{url}/metrics").text
    assert metric(lb, "modgen_lb_replica_restarts", f'replica="{victim}"') == 1
    assert metric(lb, "modgen_lb_replica_failures_total", f'replica="{victim}"') == len(failed)
    spread = asyncio.run(_concurrent(api, [SHORT] * 4))
    assert {h for h, _ in spread} == {"0", "1"}  # the new process takes work again

    # 5. SIGTERM: in-flight work finishes, replicas and balancer exit cleanly
    pids = [r["pid"] for r in replicas(url)]
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", api, json={**LONG, "max_tokens": 200, "stream": True}) as r,
    ):
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        events = [line for line in lines if line]
    assert events[-1] == "data: [DONE]" and '"finish_reason":"length"' in events[-2]
    assert proc.wait(timeout=30) == 0
    figures["SIGTERM to exit (s)"] = round(time.monotonic() - t0, 2)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    print("\nreplica test figures:", json.dumps(figures, indent=1))


def _restarted(url: str, index: str) -> dict | None:
    rep = replicas(url)[int(index)]
    return rep if rep["restarts"] == 1 and rep["healthy"] else None


async def _concurrent(api: str, bodies: list[dict]) -> list[tuple[str, int]]:
    async with httpx.AsyncClient(timeout=60) as http:
        rs = await asyncio.gather(*(http.post(api, json=b) for b in bodies))
    return [(r.headers["x-modgen-replica"], r.status_code) for r in rs]


async def _kill_during_load(url: str, api: str) -> dict:
    """Three long streams and three long non-streamed requests; SIGKILL the first stream's
    replica once all run. Reports how each request ended, and how many still run 3 s later."""
    recs = [{"replica": None, "error": None, "events_after_kill": 0, "kind": "stream"}
            for _ in range(3)]  # fmt: skip
    started = [asyncio.Event() for _ in range(3)]
    killed = asyncio.Event()
    ended: list[dict] = []
    kill_at: list[float] = []

    async def stream(http: httpx.AsyncClient, rec: dict, started: asyncio.Event) -> None:
        async with http.stream("POST", api, json={**LONG, "stream": True}) as r:
            rec["replica"] = r.headers["x-modgen-replica"]
            async for line in r.aiter_lines():
                started.set()
                rec["events_after_kill"] += bool(killed.is_set() and line)
                if line.startswith('data: {"error"'):
                    rec["error"] = json.loads(line[6:])["error"]["code"]
                if rec["error"] or rec["events_after_kill"] >= 20:
                    break
        ended.append({**rec, "after_kill_s": time.monotonic() - kill_at[0]})

    async def whole(http: httpx.AsyncClient) -> None:
        r = await http.post(api, json=LONG)
        error = r.json()["error"]["code"] if r.status_code != 200 else None
        after = time.monotonic() - kill_at[0]
        replica = r.headers["x-modgen-replica"]
        ended.append({"replica": replica, "error": error, "events_after_kill": 1,
                      "after_kill_s": after, "kind": "whole"})  # fmt: skip

    async with httpx.AsyncClient(timeout=60) as http:
        streams = [
            asyncio.create_task(stream(http, rec, e)) for rec, e in zip(recs, started, strict=True)
        ]
        await asyncio.gather(*(e.wait() for e in started))
        wholes = [asyncio.create_task(whole(http)) for _ in range(3)]
        await asyncio.sleep(0.3)  # the non-streamed ones run too
        victim = recs[0]["replica"]
        pid = (await http.get(f"{url}/replicas")).json()["replicas"][int(victim)]["pid"]
        kill_wall = time.time()
        kill_at.append(time.monotonic())
        os.kill(pid, signal.SIGKILL)
        killed.set()
        await asyncio.wait_for(asyncio.gather(*streams), timeout=30)
        _, pending = await asyncio.wait(wholes, timeout=3.0)
        for task in pending:  # 3000-token answers of the surviving replica: no need to wait
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return {"victim": victim, "kill_wall": kill_wall, "ended": ended, "still_running": len(pending)}


def test_a_balancer_fronts_replicas_on_other_hosts(tmp_path):
    """serve.replica_urls: replicas started elsewhere (here: a single-engine server on another
    port) are health-checked and routed to; one that stops answering is taken out until it
    answers again."""
    ckpt = make_checkpoint(tmp_path / "ckpt", "mistral")
    ports = {"replica": free_port(), "balancer": free_port()}
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ports}  # noqa: SIM115
    base = ["task=serve", "model=mistral", f"model.checkpoint={ckpt}", "+scheduler=splitfuse"]

    def start(name: str, *extra: str) -> subprocess.Popen:
        args = [*base, f"serve.port={ports[name]}", f"hydra.run.dir={tmp_path / name}", *extra]
        return subprocess.Popen([sys.executable, "-m", "modgen", *args], stdout=logs[name],
                                stderr=logs[name])  # fmt: skip

    def healthy(port: int) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
        except httpx.HTTPError:
            return False

    remote = f"http://127.0.0.1:{ports['replica']}"
    replica = start("replica")
    balancer = start("balancer", "serve.replicas=0", f"serve.replica_urls=[{remote}]",
                     "serve.health_interval_s=0.2", "serve.health_failures=2")  # fmt: skip
    url = f"http://127.0.0.1:{ports['balancer']}"
    try:
        wait_for(lambda: healthy(ports["replica"]) and healthy(ports["balancer"]), timeout=180)
        r = httpx.post(f"{url}/v1/completions", json=SHORT, timeout=60)
        assert r.status_code == 200 and r.headers["x-modgen-replica"] == "0"
        (rep,) = replicas(url)
        assert rep["remote"] == remote and rep["healthy"] and rep["pid"] is None
        replica.kill()
        replica.wait()
        wait_for(lambda: httpx.get(f"{url}/health").status_code == 503, timeout=10)
        assert httpx.post(f"{url}/v1/completions", json=SHORT, timeout=60).status_code >= 500
        replica = start("replica")  # back on the same address: routed to again
        wait_for(lambda: healthy(ports["balancer"]), timeout=180)
        assert httpx.post(f"{url}/v1/completions", json=SHORT, timeout=60).status_code == 200
    finally:
        for proc in (replica, balancer):
            proc.kill()
        for log in logs.values():
            log.close()
