"""One engine behind HTTP: ``serve_engine`` (``task=serve`` with one replica) and the replica
process entry point ``python -m modgen.serve.worker CONFIG.yaml --port-file F``, which the load
balancer starts for each replica."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    import socket

    from modgen.serve.task import ServeTask

log = logging.getLogger(__name__)


def serve_engine(
    root: DictConfig, cfg: ServeTask.Config, model_name: str, sock: socket.socket,
    on_listening: Callable[[], None] | None = None,
) -> None:  # fmt: skip
    """Build the engine ``root`` describes and serve it on ``sock`` until SIGTERM / Ctrl+C.

    Should the engine fail for good (``Engine.is_healthy``), the server stops and this raises
    EngineDeadError, so the process exits non-zero and a supervisor (or the balancer, for a
    replica) restarts it; until it has stopped, /health answers 503."""
    from modgen.engine import Engine
    from modgen.engine.async_engine import EngineDeadError
    from modgen.serve.app import create_app
    from modgen.serve.server import make_server, serve_forever

    engine = Engine.from_config(root)
    failures: list[BaseException] = []

    def engine_failed(exc: BaseException) -> None:
        failures.append(exc)
        server.handle_exit(signal.SIGTERM, None)  # drain what is left and stop

    app = create_app(engine, cfg, model_name, on_engine_failed=engine_failed)
    server = make_server(app, cfg.grace_period_s, app.state.modgen.begin_shutdown, cfg.access_log)
    if on_listening is not None:
        on_listening()
    serve_forever(server, sock, f"'{model_name}'")
    if failures:
        raise EngineDeadError(
            f"the engine failed ({failures[0]}); exiting non-zero so that it is restarted"
        )


def _exit_with_parent() -> None:
    """Drain and exit if the balancer that started this process goes away."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        log.warning("the load balancer exited; stopping")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    """Replica entry point: serve the saved root config on 127.0.0.1 (a free port), and write
    that port to ``--port-file`` once listening."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("config", type=Path, help="the root config (YAML) to build the engine from")
    ap.add_argument("--port-file", type=Path, required=True)
    ap.add_argument("--index", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format=f"[%(asctime)s][replica {args.index}][%(name)s] %(message)s"
    )
    from modgen import registry
    from modgen.serve.server import bind_socket
    from modgen.serve.task import serve_config

    registry.load_plugins()
    root = OmegaConf.load(args.config)
    assert isinstance(root, DictConfig)
    cfg = serve_config(root)
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]

    def announce() -> None:
        tmp = args.port_file.with_suffix(".tmp")
        tmp.write_text(str(port))
        tmp.replace(args.port_file)

    _exit_with_parent()
    name = cfg.served_model_name or str(root.model.name)
    serve_engine(root, cfg, name, sock, on_listening=announce)


if __name__ == "__main__":
    main()
