"""The balancer retries a request on another healthy replica when its replica fails (or refuses
it with a 503) before answering; fake replicas stand in for engine processes."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from serve_utils import metric

from modgen.serve.balancer import create_balancer_app
from modgen.serve.replicas import ReplicaPool
from modgen.serve.server import ServerThread
from modgen.serve.task import ServeTask


class Hangup:
    """A replica that dies on every request: accepts the connection, closes it unanswered."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.hits = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                conn.recv(65536)
                self.hits += 1
                conn.close()


def answering(status: int) -> ServerThread:
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions() -> JSONResponse:
        return JSONResponse({"status": status}, status_code=status)

    return ServerThread(app).start()


@pytest.fixture(scope="module")
def replicas():
    ok, refusing, dead = answering(200), answering(503), Hangup()
    ports = {
        "ok": int(ok.url.rsplit(":", 1)[1]),
        "refusing": int(refusing.url.rsplit(":", 1)[1]),
        "dead": dead.port,
    }
    yield ports
    ok.stop()
    refusing.stop()
    dead.sock.close()


def balance(tmp_path, ports: list[int], body: dict) -> tuple[httpx.Response, str]:
    cfg = ServeTask.Config(replicas=len(ports))
    pool = ReplicaPool(tmp_path / "unused.yaml", cfg, tmp_path)
    for rep, port in zip(pool.replicas, ports, strict=True):
        rep.port, rep.healthy = port, True
    app = create_balancer_app(pool, cfg)  # its lifespan (starting processes) is not run

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://lb") as http:
            r = await http.post("/v1/completions", json=body)
            return r, (await http.get("/metrics")).text

    return asyncio.run(main())


BODY = {"model": "mistral", "prompt": "w3", "max_tokens": 2}


def test_a_replica_that_dies_before_answering_is_retried_elsewhere(tmp_path, replicas):
    r, metrics = balance(tmp_path, [replicas["dead"], replicas["ok"]], BODY)
    assert r.status_code == 200 and r.headers["x-modgen-replica"] == "1"
    assert metric(metrics, "modgen_lb_retries_total", 'replica="0"') == 1
    assert metric(metrics, "modgen_lb_replica_failures_total", 'replica="0"') == 0


def test_a_replica_refusing_with_503_is_retried_elsewhere(tmp_path, replicas):
    r, metrics = balance(tmp_path, [replicas["refusing"], replicas["ok"]], BODY)
    assert r.status_code == 200 and r.headers["x-modgen-replica"] == "1"
    assert metric(metrics, "modgen_lb_retries_total", 'replica="0"') == 1
    r, _ = balance(tmp_path, [replicas["refusing"]], BODY)  # nowhere else: its answer passes
    assert r.status_code == 503


def test_when_every_replica_dies_the_client_gets_a_502(tmp_path, replicas):
    r, metrics = balance(tmp_path, [replicas["dead"], replicas["dead"]], BODY)
    err = r.json()["error"]
    assert r.status_code == 502 and err["code"] == "replica_failed"
    assert metric(metrics, "modgen_lb_retries_total", 'replica="0"') == 1
    assert metric(metrics, "modgen_lb_retries_total", 'replica="1"') == 1
    assert sum(metric(metrics, "modgen_lb_replica_failures_total", f'replica="{i}"')
               for i in (0, 1)) == 1  # fmt: skip
