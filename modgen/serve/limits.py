"""Bounds on what a client may send: an ASGI middleware that reads each request's body whole,
within a size limit and a deadline, before the app sees it."""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from modgen.serve.web import APIError


class _TooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


class BodyLimit:
    """Reads a request's body before passing the request on, and refuses one larger than
    ``max_bytes`` (HTTP 413, at once when Content-Length says so) or not received within
    ``timeout_s`` (HTTP 408): a client cannot make the server buffer without bound, nor hold a
    connection open by sending a body slowly. Both refusals close the connection. The app then
    receives the body as one message; later ``receive`` calls (disconnect) pass through."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            if _content_length(scope) > self.max_bytes:
                raise _TooLarge
            body = await asyncio.wait_for(self._read(receive), self.timeout_s)
        except _TooLarge:
            mib = self.max_bytes / 2**20
            await _refuse(scope, receive, send, 413, f"the request body exceeds {mib:g} MiB")
            return
        except asyncio.TimeoutError:
            message = f"the request body was not received within {self.timeout_s:g} s"
            await _refuse(scope, receive, send, 408, message)
            return
        except _ClientGone:
            return
        first: Message | None = {"type": "http.request", "body": body, "more_body": False}

        async def replay() -> Message:
            nonlocal first
            if first is None:
                return await receive()
            message, first = first, None
            return message

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _content_length(scope: Scope) -> int:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
    code = "request_too_large" if status == 413 else "request_timeout"
    err = APIError(status, message, code=code, headers={"connection": "close"})
    await err.response()(scope, receive, send)
