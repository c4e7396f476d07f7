"""The OpenAI-compatible FastAPI app of one engine: completions, chat completions, models,
health and Prometheus metrics, with optional API keys."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException

from modgen.engine import Engine
from modgen.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from modgen.sampling_params import BadRequestError
from modgen.serve import openapi
from modgen.serve.limits import BodyLimit
from modgen.serve.metrics import ServerMetrics
from modgen.serve.openai_routes import router as openai_router
from modgen.serve.protocol import ChatCompletionRequest, CompletionRequest
from modgen.serve.web import APIError, to_api_error

if TYPE_CHECKING:
    from modgen.serve.task import ServeTask

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class ServerState:
    """What the routes share: the engine, its asyncio front, settings and metrics."""

    engine: Engine
    config: ServeTask.Config
    model_name: str
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    aengine: AsyncEngine | None = None
    on_engine_failed: Callable[[BaseException], None] | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    workers: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="modgen-prepare")
    )
    """Where requests are parsed, tokenized and chat-templated: never on the event loop."""
    _shutdown: asyncio.Task | None = None

    def start(self) -> None:
        """Start the engine loop (on the running event loop)."""
        self.aengine = AsyncEngine(
            self.engine, self.config.max_queued, hooks=self.metrics, max_step_stats=1024,
            on_failure=self._engine_failed,
        )  # fmt: skip
        self.metrics.bind(self.aengine)
        self.aengine.start()

    def _engine_failed(self, exc: BaseException) -> None:
        log.error("the engine failed (%s); /health answers 503 from now on", exc)
        if self.on_engine_failed is not None:
            self.on_engine_failed(exc)

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` run in the server's worker thread, so the event loop goes on serving
        streams and /health meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.workers, fn, *args)

    def begin_shutdown(self) -> asyncio.Task:
        """Stop taking requests; in-flight ones get ``grace_period_s`` to finish, then are
        aborted (their clients get an error). Idempotent."""
        if self._shutdown is None:
            assert self.aengine is not None
            grace = self.config.grace_period_s
            self._shutdown = asyncio.ensure_future(self.aengine.shutdown(grace))
        return self._shutdown

    @property
    def healthy(self) -> bool:
        """Whether the engine takes requests."""
        return self.aengine is not None and self.aengine.is_accepting


def state_of(request: Request) -> ServerState:
    """The server state of the app serving ``request``."""
    return request.app.state.modgen


def _authorize(request: Request) -> None:
    keys = state_of(request).config.api_keys
    if not keys:
        return
    check_api_key(request.headers.get("authorization", ""), keys)


def check_api_key(header: str, keys: list[str]) -> None:
    """Raise a 401 APIError unless ``header`` is ``Bearer KEY`` with one of ``keys``."""
    scheme, _, token = header.partition(" ")
    token_b = token.strip().encode()
    ok = scheme.lower() == "bearer" and any(hmac.compare_digest(token_b, k.encode()) for k in keys)
    if not ok:
        raise APIError(
            401, "missing or incorrect API key: send 'Authorization: Bearer KEY'",
            param=None, code="invalid_api_key",
        )  # fmt: skip


def create_app(
    engine: Engine, config: ServeTask.Config, model_name: str,
    on_engine_failed: Callable[[BaseException], None] | None = None,
) -> FastAPI:  # fmt: skip
    """The app serving ``engine``. Its engine loop starts and stops with the app's lifespan;
    ``app.state.modgen.begin_shutdown()`` drains it (the server calls it on SIGTERM). Should
    the engine fail (``Engine.is_healthy``), /health answers 503 and ``on_engine_failed`` is
    called (the server then exits, so that a supervisor restarts it)."""
    state = ServerState(engine, config, model_name, on_engine_failed=on_engine_failed)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start()
        yield
        await state.begin_shutdown()
        state.workers.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="modgen", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.modgen = state
    app.add_middleware(
        BodyLimit, max_bytes=int(config.max_body_mb * 2**20), timeout_s=config.body_timeout_s
    )
    _add_error_handlers(app, state)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_authorize)])
    v1.include_router(openai_router)
    v1.add_api_route("/models", _models, methods=["GET"], responses=openapi.errors(401))
    app.include_router(v1)
    health = {
        200: {"description": "The engine takes requests"},
        503: {"description": "It does not"},
    }
    app.add_api_route("/health", _health, methods=["GET"], responses=health)
    text = {200: {"description": "Prometheus metrics", "content": {"text/plain": {}}}}
    app.add_api_route(
        "/metrics", _metrics, methods=["GET"], response_class=PlainTextResponse, responses=text
    )
    requests = [CompletionRequest, ChatCompletionRequest]
    openapi.install(app, requests, model_name, engine.spec.vocab_size)
    return app


def _add_error_handlers(app: FastAPI, state: ServerState) -> None:
    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        err = to_api_error(exc)
        state.metrics.rejected.labels(err.reason).inc()
        return err.response()

    for exc_type in (APIError, BadRequestError, QueueFullError, EngineDeadError):
        app.add_exception_handler(exc_type, api_error)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return APIError(exc.status_code, message, headers=exc.headers).response()

    app.add_exception_handler(HTTPException, http_error)


async def _models(request: Request) -> dict[str, Any]:
    st = state_of(request)
    card = {
        "id": st.model_name, "object": "model", "created": st.created, "owned_by": "modgen",
        "max_model_len": st.engine.max_model_len,
    }  # fmt: skip
    return {"object": "list", "data": [card]}


async def _health(request: Request) -> JSONResponse:
    st = state_of(request)
    if st.healthy:
        return JSONResponse({"status": "ok"})
    reason = "shutting down" if st.aengine is None or st.aengine.error is None else "engine failed"
    return JSONResponse({"status": reason}, status_code=503)


async def _metrics(request: Request) -> Response:
    body, content_type = state_of(request).metrics.render()
    return Response(body, media_type=content_type)
