"""The load balancer in front of replicas: proxies /v1 to the replica with the least outstanding
work (streams pass through event by event), reports replica health, restarts dead replicas. A
request whose replica fails before answering is retried on another healthy replica."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from omegaconf import DictConfig, OmegaConf
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from modgen.serve.app import check_api_key
from modgen.serve.limits import BodyLimit
from modgen.serve.protocol import MAX_N, error_body
from modgen.serve.replicas import Replica, ReplicaPool
from modgen.serve.web import (
    SSE_DONE,
    APIError,
    ClosingStreamingResponse,
    sse,
    unless_disconnected,
)  # fmt: skip

if TYPE_CHECKING:
    from modgen.serve.task import ServeTask

log = logging.getLogger(__name__)
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer",
               "upgrade", "host"}  # fmt: skip
FORWARD_HEADERS = ("authorization", "content-type", "accept")
_background: set[asyncio.Task] = set()


class _Metrics:
    def __init__(self, pool: ReplicaPool) -> None:
        r = self.registry = CollectorRegistry()
        self.routed = Counter(
            "modgen_lb_requests", "Requests sent to each replica.", ["replica"], registry=r
        )
        self.failed = Counter(
            "modgen_lb_replica_failures", "Requests that failed because their replica did.",
            ["replica"], registry=r,
        )  # fmt: skip
        self.retried = Counter(
            "modgen_lb_retries", "Requests taken from a replica that failed, or refused them "
            "(503), before answering: tried on another one.", ["replica"], registry=r,
        )  # fmt: skip
        outstanding = Gauge(
            "modgen_lb_outstanding_work", "Unanswered work units per replica.", ["replica"],
            registry=r,
        )  # fmt: skip
        up = Gauge(
            "modgen_lb_replica_up", "Whether a replica takes requests.", ["replica"], registry=r
        )
        restarts = Gauge(
            "modgen_lb_replica_restarts", "Restarts of each replica.", ["replica"], registry=r
        )
        for rep in pool.replicas:
            label = str(rep.index)
            outstanding.labels(label).set_function(lambda rep=rep: rep.outstanding)
            up.labels(label).set_function(lambda rep=rep: float(rep.healthy))
            restarts.labels(label).set_function(lambda rep=rep: rep.restarts)


def _work(body: bytes) -> int:
    """Work units of a request: its number of choices (``n``), 1 if unreadable."""
    try:
        n = json.loads(body).get("n") or 1
    except (ValueError, AttributeError):
        return 1
    return n if isinstance(n, int) and 1 <= n <= MAX_N else 1


def create_balancer_app(pool: ReplicaPool, cfg: ServeTask.Config) -> FastAPI:
    """The balancer app; starting it starts the replicas (and waits until they are ready)."""
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(connect=5.0, read=None, write=60.0, pool=None),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
    )
    metrics = _Metrics(pool)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await pool.start()
        yield
        await pool.stop()
        await client.aclose()

    app = FastAPI(title="modgen balancer", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.pool = pool
    app.add_middleware(
        BodyLimit, max_bytes=int(cfg.max_body_mb * 2**20), timeout_s=cfg.body_timeout_s
    )

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return exc.response()

    app.add_exception_handler(APIError, api_error)

    def authorize(request: Request) -> None:
        if cfg.api_keys:
            check_api_key(request.headers.get("authorization", ""), cfg.api_keys)

    @app.get("/health")
    async def health() -> JSONResponse:
        up = pool.num_healthy
        status = 200 if up and not pool.closing else 503
        return JSONResponse(
            {"status": "ok" if status == 200 else "unavailable", "replicas_up": up}, status
        )

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/replicas")
    async def replicas(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"replicas": [r.status() for r in pool.replicas]}

    @app.api_route("/v1/{path:path}", methods=["GET", "POST"])
    async def proxy(request: Request, path: str) -> Response:
        authorize(request)
        return await _proxy(request, path, pool, client, metrics)

    return app


async def _proxy(
    request: Request, path: str, pool: ReplicaPool, client: httpx.AsyncClient, metrics: _Metrics
) -> Response:
    body = await request.body()
    work = _work(body)
    headers = {k: v for k in FORWARD_HEADERS if (v := request.headers.get(k)) is not None}
    tried: set[int] = set()
    failed: tuple[Replica, httpx.TransportError] | None = None
    while True:
        rep = None if pool.closing else pool.pick(tried)
        if rep is None and failed is not None:  # every replica tried failed
            metrics.failed.labels(str(failed[0].index)).inc()
            raise _replica_failed(*failed)
        if rep is None:
            raise APIError(503, "no replica is available; retry later", "service_unavailable",
                           code="no_replica", headers={"Retry-After": "1"})  # fmt: skip
        rep.outstanding += work
        rep.routed += 1
        metrics.routed.labels(str(rep.index)).inc()
        upstream_req = client.build_request(
            request.method, f"{rep.url}/v1/{path}", content=body, headers=headers,
            params=request.query_params,
        )  # fmt: skip
        try:
            upstream = await unless_disconnected(request, client.send(upstream_req, stream=True))
        except httpx.TransportError as exc:  # no answer began: safe to try another replica
            rep.outstanding -= work
            tried.add(rep.index)
            metrics.retried.labels(str(rep.index)).inc()
            failed = rep, exc
            continue
        except httpx.HTTPError as exc:
            rep.outstanding -= work
            metrics.failed.labels(str(rep.index)).inc()
            raise _replica_failed(rep, exc) from exc
        if upstream is not None and upstream.status_code == 503 and pool.pick({*tried, rep.index}):
            # it took nothing (its engine failed, or it drains): another replica may
            rep.outstanding -= work
            tried.add(rep.index)
            metrics.retried.labels(str(rep.index)).inc()
            await upstream.aclose()
            continue
        break
    if upstream is None:  # the client left before the answer began
        rep.outstanding -= work
        return Response(status_code=499)
    return await _answer(request, upstream, rep, work, metrics)


def _replica_failed(rep: Replica, exc: BaseException) -> APIError:
    return APIError(
        502, f"replica {rep.index} failed during the request ({type(exc).__name__}: {exc})",
        "server_error", code="replica_failed", headers={"x-modgen-replica": str(rep.index)},
    )  # fmt: skip


async def _answer(
    request: Request, upstream: httpx.Response, rep: Replica, work: int, metrics: _Metrics
) -> Response:
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            rep.outstanding -= work
            task = asyncio.ensure_future(upstream.aclose())
            _background.add(task)
            task.add_done_callback(_background.discard)

    headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
    headers["x-modgen-replica"] = str(rep.index)
    if upstream.headers.get("content-type", "").startswith("text/event-stream"):
        events = _relay(upstream, rep, metrics)
        return ClosingStreamingResponse(
            events, on_close=release, status_code=upstream.status_code, headers=headers
        )
    try:
        data = await unless_disconnected(request, upstream.aread())
    except httpx.HTTPError as exc:
        metrics.failed.labels(str(rep.index)).inc()
        raise _replica_failed(rep, exc) from exc
    finally:
        release()
    if data is None:
        return Response(status_code=499)
    return Response(data, status_code=upstream.status_code, headers=headers)


async def _relay(upstream: httpx.Response, rep: Replica, metrics: _Metrics) -> AsyncIterator[bytes]:
    """Pass the replica's events through whole; if the replica fails, end with an error event."""
    buf = b""
    try:
        async for chunk in upstream.aiter_raw():
            buf += chunk
            cut = buf.rfind(b"\n\n")
            if cut >= 0:
                yield buf[: cut + 2]
                buf = buf[cut + 2 :]
    except httpx.HTTPError as exc:
        metrics.failed.labels(str(rep.index)).inc()
        err = _replica_failed(rep, exc)
        yield sse(error_body(str(err), "server_error", code="replica_failed")).encode()
        yield SSE_DONE.encode()


def serve_replicas(root: DictConfig, cfg: ServeTask.Config, model_name: str, workdir: Path) -> None:
    """Start ``cfg.replicas`` engine processes (and front ``cfg.replica_urls``) and serve the
    balancer until SIGTERM / Ctrl+C."""
    from modgen.serve.server import bind_socket, make_server, serve_forever

    sock = bind_socket(cfg.host, cfg.port)  # fail early if the port is taken
    workdir.mkdir(parents=True, exist_ok=True)
    replica_root = OmegaConf.to_container(root, resolve=True)
    replica_root["serve"].update(replicas=1, host="127.0.0.1", port=0, allow_remote=False)
    replica_root["serve"]["replica_urls"] = []
    engine = replica_root["engine"]
    if engine.get("num_threads") is None and engine.get("device", "cpu") == "cpu":
        # replicas share the machine's cores instead of each taking all of them
        engine["num_threads"] = max(1, (os.cpu_count() or 1) // max(cfg.replicas, 1))
    config_path = workdir / "replica_config.yaml"
    OmegaConf.save(OmegaConf.create(replica_root), config_path)
    pool = ReplicaPool(config_path, cfg, workdir)
    app = create_balancer_app(pool, cfg)
    server = make_server(app, cfg.grace_period_s, pool.begin_shutdown, cfg.access_log)
    remote = f" and {len(cfg.replica_urls)} remote" if cfg.replica_urls else ""
    serve_forever(server, sock, f"'{model_name}' with {cfg.replicas} replicas{remote}")
