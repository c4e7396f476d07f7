"""Helpers of the serving tests: an in-process server on a free loopback port, a slower engine,
Prometheus text parsing."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from modgen.config import compose_config
from modgen.engine import Engine
from modgen.serve.app import create_app
from modgen.serve.server import ServerThread
from modgen.serve.task import serve_config

CHAT_TEMPLATE = "{% for m in messages %}{{ m.content }} {% endfor %}"


@dataclass
class Served:
    """A running in-process server and its engine."""

    url: str
    engine: Engine
    thread: ServerThread

    @property
    def state(self):
        return self.thread.server.config.app.state.modgen


def start_server(checkpoint: Path, *overrides: str) -> Served:
    """Serve the tiny mistral checkpoint with ``task=serve`` overrides, in a thread."""
    cfg = compose_config(
        [
            "model=mistral",
            f"model.checkpoint={checkpoint}",
            "+scheduler=splitfuse",
            "task=serve",
            f"serve.chat_template='{CHAT_TEMPLATE}'",
            *overrides,
        ]
    )
    serve_cfg = serve_config(cfg)
    engine = Engine.from_config(cfg)
    app = create_app(engine, serve_cfg, "mistral")
    thread = ServerThread(app, serve_cfg.grace_period_s, app.state.modgen.begin_shutdown)
    return Served(thread.start().url, engine, thread)


@contextlib.contextmanager
def slow_steps(engine: Engine, seconds: float) -> Iterator[None]:
    """Make every engine step take at least ``seconds`` (so streams stay open a while)."""
    step = engine.step

    def slow():
        time.sleep(seconds)
        return step()

    engine.step = slow
    try:
        yield
    finally:
        engine.step = step


def metric(text: str, name: str, labels: str = "") -> float:
    """One sample of a Prometheus exposition (0 if absent)."""
    pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" ([0-9.e+-]+)$"
    m = re.search(pattern, text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def wait_until_serving(proc, url: str, log: Path, timeout: float = 120) -> None:
    """Wait for the server process ``proc`` to answer 200 on ``url``/health (its log shown
    should it exit first)."""
    import httpx

    def up() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return httpx.get(f"{url}/health").status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, timeout=timeout, interval=0.2)


def wait_for(predicate, timeout: float, interval: float = 0.02):
    """Poll until ``predicate()`` is truthy; returns its value or raises after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")
