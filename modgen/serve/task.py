"""``task=serve``: a persistent OpenAI-compatible server, one engine or N replicas behind a
least-outstanding-work load balancer.

    python -m modgen task=serve model=mistral +scheduler=splitfuse serve.port=8000

Importing this module is cheap: the web stack is imported when the task runs.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from modgen.registry import register
from modgen.task import Task, TaskConfig

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve_config(root: DictConfig) -> ServeTask.Config:
    """The typed ``serve.*`` settings of a composed ``task=serve`` config."""
    from modgen import registry

    if root.get("serve") is None:
        raise ValueError("no serve settings: compose with task=serve")
    return registry.to_config("task", root.serve)


@register("task", "serve")
class ServeTask(Task):
    """Serves the composed engine over HTTP until SIGTERM or Ctrl+C."""

    @dataclass(kw_only=True)
    class Config(TaskConfig):
        """An OpenAI-compatible HTTP server."""

        host: str = "127.0.0.1"
        """Address to listen on; anything but loopback needs allow_remote=true."""
        port: int = 8000
        """TCP port (0 picks a free one and logs it)."""
        allow_remote: bool = False
        """Explicitly allow a non-loopback host (other machines can then connect)."""
        replicas: int = 1
        """Engine processes; more than 1 (or any replica_urls) puts a least-outstanding-work
        balancer in front."""
        replica_urls: list[str] = field(default_factory=list)
        """Replicas on other hosts (``http://HOST:PORT`` of a modgen server, or any
        OpenAI-compatible one answering ``/health``), fronted beside the local ones; with them,
        replicas may be 0 (a balancer only)."""
        api_keys: list[str] = field(default_factory=list)
        """Accepted keys (``Authorization: Bearer KEY``) on every /v1 route; empty: no check."""
        max_queued: int | None = 256
        """Most unfinished requests per engine; beyond it requests get HTTP 429. None: no limit."""
        grace_period_s: float = 10.0
        """On SIGTERM, how long in-flight requests may run before they are aborted."""
        served_model_name: str | None = None
        """The ``model`` clients must name; None: the model config's name (e.g. mistral)."""
        chat_template: str | None = None
        """Jinja chat template over ``messages``; None: the tokenizer's own."""
        health_interval_s: float = 1.0
        """Replicas: seconds between health checks (a dead process is noticed at once)."""
        health_failures: int = 3
        """Replicas: failed health checks in a row after which a replica is killed and restarted."""
        replica_start_timeout_s: float = 600.0
        """Replicas: how long a replica may take to load before its start counts as failed."""
        access_log: bool = False
        """Log every HTTP request."""
        max_body_mb: float = 16.0
        """Largest request body, in MiB; a larger one gets HTTP 413 (before it is read whole
        when its Content-Length says so)."""
        body_timeout_s: float = 30.0
        """How long a client may take to send a request body; then HTTP 408 and the connection
        is closed."""
        default_max_tokens: int | None = None
        """max_tokens of a chat request that sets neither it nor max_completion_tokens; None:
        what is left of the context (as OpenAI and vLLM). Completions default to 16 (OpenAI's)."""

        def __post_init__(self) -> None:
            if not self.allow_remote and not is_loopback(self.host):
                raise ValueError(
                    f"serve.host={self.host} would accept connections from other machines; "
                    "set serve.allow_remote=true to do that on purpose (and consider "
                    "serve.api_keys)"
                )
            checks = [
                (0 <= self.port <= 65535, "port", "in [0, 65535]"),
                (
                    self.replicas >= (0 if self.replica_urls else 1),
                    "replicas",
                    ">= 1 (or >= 0 with replica_urls)",
                ),
                (
                    all(u.startswith(("http://", "https://")) for u in self.replica_urls),
                    "replica_urls",
                    "http:// or https:// URLs",
                ),
                (self.max_queued is None or self.max_queued >= 1, "max_queued", ">= 1 or null"),
                (self.grace_period_s >= 0, "grace_period_s", ">= 0"),
                (self.health_interval_s > 0, "health_interval_s", "> 0"),
                (self.health_failures >= 1, "health_failures", ">= 1"),
                (all(k for k in self.api_keys), "api_keys", "non-empty strings"),
                (self.max_body_mb > 0, "max_body_mb", "> 0"),
                (self.body_timeout_s > 0, "body_timeout_s", "> 0"),
                (
                    self.default_max_tokens is None or self.default_max_tokens >= 1,
                    "default_max_tokens",
                    ">= 1 or null",
                ),
            ]
            for ok, name, expected in checks:
                if not ok:
                    value = getattr(self, name)
                    raise ValueError(f"serve.{name} must be {expected}, got {value!r}")

    config: Config

    def run(self, root: DictConfig, output_dir: Path) -> dict[str, Any]:
        """Serve until stopped; returns what was served."""
        cfg = serve_config(root)
        name = cfg.served_model_name or str(root.model.name)
        if cfg.allow_remote and not is_loopback(cfg.host) and not cfg.api_keys:
            log.warning(
                "serving on %s without serve.api_keys: anyone who can reach it may use it", cfg.host
            )
        if cfg.replicas == 1 and not cfg.replica_urls:
            from modgen.serve.server import bind_socket
            from modgen.serve.worker import serve_engine

            serve_engine(root, cfg, name, bind_socket(cfg.host, cfg.port))
        else:
            from modgen.serve.balancer import serve_replicas

            serve_replicas(root, cfg, name, output_dir)
        return {"served_model_name": name, "replicas": cfg.replicas + len(cfg.replica_urls)}
