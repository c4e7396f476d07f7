"""HTTP plumbing shared by the server and the balancer: errors with OpenAI-style bodies,
server-sent events, a streaming response that always cleans up, and client-disconnect races."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from modgen.engine.async_engine import EngineDeadError, QueueFullError
from modgen.outputs import RequestOutput
from modgen.sampling_params import BadRequestError
from modgen.serve.protocol import error_body

T = TypeVar("T")


class APIError(Exception):
    """An error answered with ``status`` and an OpenAI-style body."""

    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error",
        param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.headers = status, headers
        self.body = error_body(message, type_, param, code)
        self.reason = code or type_

    def response(self) -> JSONResponse:
        """As a JSON response."""
        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


def to_api_error(exc: BaseException) -> APIError:
    """The HTTP error for an exception raised while taking or running a request."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, BadRequestError):
        return APIError(400, str(exc), param=exc.field, code="bad_request")
    if isinstance(exc, QueueFullError):
        return APIError(
            429, f"the server is at capacity, retry later: {exc}", "rate_limit_error",
            code="queue_full", headers={"Retry-After": "1"},
        )  # fmt: skip
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), "service_unavailable", code="engine_unavailable")
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")


def check_output(out: RequestOutput) -> None:
    """Raise the APIError of an output that ended in failure (engine error or abort)."""
    if out.finish_reason == "error":
        raise APIError(
            500, f"the request failed inside the engine: {out.error}", "server_error",
            code="engine_error",
        )  # fmt: skip
    if out.finish_reason == "abort":
        raise APIError(
            503, "the request was aborted: the server is shutting down", "service_unavailable",
            code="aborted",
        )  # fmt: skip


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event carrying ``data`` (JSON unless already a string)."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n"


SSE_DONE = sse("[DONE]")


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that calls ``on_close`` however it ends: finished, client gone,
    cancelled at shutdown, or cancelled before its body was ever iterated."""

    def __init__(self, content: Any, on_close: Callable[[], Any], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Await ``work`` unless the client disconnects first; then cancel it and return None.
    For requests whose body has been read and whose answer is not streamed."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watch
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait({task})
    return None if task.cancelled() else task.result()
