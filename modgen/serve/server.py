"""Running an app on uvicorn: a socket bound by us (so port 0 works and the port is known), a
server that drains on SIGTERM before it stops, and a background-thread runner for tests."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn

log = logging.getLogger(__name__)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.listen(2048)
    return sock


def url_of(sock: socket.socket) -> str:
    """``http://host:port`` of a bound socket."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class DrainingServer(uvicorn.Server):
    """A uvicorn server that, on SIGTERM or SIGINT, first calls ``on_exit`` (on its event loop:
    the app stops taking requests and gives in-flight ones a grace period), then shuts down
    as uvicorn does: no new connections, wait for open ones (up to ``grace_s`` plus a margin
    for aborted responses to flush), stop. It then returns normally (exit status 0)."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], Any] | None = None) -> None:
        super().__init__(config)
        self._on_exit = on_exit
        self._loop: asyncio.AbstractEventLoop | None = None
        self.started_event = threading.Event()

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        """Serve on ``sockets`` until asked to exit."""
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's startup, then flag that the server takes connections."""
        await super().startup(sockets)
        self.started_event.set()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Begin a graceful shutdown; a second SIGINT forces it. Safe from any thread."""
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        if not self.should_exit and self._on_exit is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._on_exit)
        self.should_exit = True


def make_server(
    app: Any, grace_s: float, on_exit: Callable[[], Any] | None, access_log: bool = False
) -> DrainingServer:
    """A DrainingServer for ``app``; logging is left to the caller (Hydra)."""
    config = uvicorn.Config(
        app, log_config=None, access_log=access_log, lifespan="on",
        timeout_graceful_shutdown=grace_s + 3.0, timeout_keep_alive=30,
    )  # fmt: skip
    return DrainingServer(config, on_exit)


def serve_forever(server: DrainingServer, sock: socket.socket, what: str) -> None:
    """Run ``server`` on ``sock`` in this thread until it is stopped (SIGTERM, Ctrl+C)."""
    log.info("modgen: serving %s on %s (OpenAI API under /v1)", what, url_of(sock))
    asyncio.run(server.serve(sockets=[sock]))
    log.info("modgen: server stopped")


class ServerThread:
    """An app served on 127.0.0.1 (a free port) from a background thread: for tests and
    notebooks. ``drain()`` does what SIGTERM does; ``stop()`` waits for the thread."""

    def __init__(self, app: Any, grace_s: float = 5.0, on_exit: Callable[[], Any] | None = None):
        self.sock = bind_socket("127.0.0.1", 0)
        self.url = url_of(self.sock)
        self.server = make_server(app, grace_s, on_exit)
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])),
            name="modgen-server", daemon=True,
        )  # fmt: skip

    def start(self, timeout: float = 60.0) -> ServerThread:
        """Start and wait until connections are accepted."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started_event.wait(0.05):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
        return self

    def drain(self) -> None:
        """Begin a graceful shutdown, as on SIGTERM."""
        self.server.handle_exit(signal.SIGTERM, None)

    def stop(self, timeout: float = 30.0) -> None:
        """Shut down (gracefully) and wait for the thread."""
        self.drain()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError("the server thread did not stop")

    @property
    def is_alive(self) -> bool:
        """Whether the server thread still runs."""
        return self._thread.is_alive()
