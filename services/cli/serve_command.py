"""`encore serve`: one uvicorn process, or a prefork parent and the workers it forks.

The worker entry points live here rather than in the composition root: they are what a serve
process runs (switch interval, logging, the parent's snapshot and ready slot), not how the
components are built.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from typing import TYPE_CHECKING

from core.errors import ConfigError
from services.cli.data_commands import require_servers
from services.infra.settings import Settings, configure_logging

log = logging.getLogger(__name__)
PRELOAD_S = 10.0  # a forked worker reads the catalogue this long at most before it accepts,
# then waits a little longer at most for its siblings (a generation starts accepting together)

if TYPE_CHECKING:  # the serving stack loads when a server starts, not with every command
    from fastapi import FastAPI

    from services.serving.prefork import WorkerMain
    from services.serving.ready_board import Seat
    from services.serving.snapshots import Snapshot


def cmd_serve(s: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from services.cli.root import STARTUP_PATIENCE_S, Root
    from services.serving.auth import ApiAuth, warn_if_open
    from services.serving.graceful_server import uvicorn_options
    from services.serving.prefork import Listener, Prefork
    from services.serving.snapshots import SnapshotBuilder

    require_servers(s)
    host, port = args.host or s.api_host, args.port or s.api_port
    warn_if_open(ApiAuth.from_settings(s), host)
    cert, key = _api_tls(s)
    if s.serve_workers == 1:
        uvicorn.run(serving_app_from_env(), host=host, port=port, **uvicorn_options(cert, key))
        return 0
    # Several processes on one port, no GIL shared between them, forked from a parent that holds
    # the snapshot (graphs once per machine; see services/serving/prefork.py).
    root = Root(s, STARTUP_PATIENCE_S)
    models = root.models()
    prefork = Prefork(s.serve_workers, SnapshotBuilder(s, models), models.current_version, serving_worker(s, cert, key))
    return prefork.run(Listener(host, port).bind())


def _api_tls(s: Settings) -> tuple[str | None, str | None]:
    """uvicorn's TLS files from ENCORE_API_TLS_CERT/KEY (both or neither; files must exist)."""
    if not s.api_tls_cert and not s.api_tls_key:
        return None, None
    if not (s.api_tls_cert and s.api_tls_key):
        raise ConfigError("ENCORE_API_TLS_CERT and ENCORE_API_TLS_KEY go together: set both for HTTPS")
    for name, path in (("ENCORE_API_TLS_CERT", s.api_tls_cert), ("ENCORE_API_TLS_KEY", s.api_tls_key)):
        if not os.path.isfile(path):
            raise ConfigError(f"{name}={path}: no such file")
    return s.api_tls_cert, s.api_tls_key


def serving_worker(settings: Settings, cert: str | None, key: str | None) -> WorkerMain:
    """What each forked `encore serve` worker runs: its own clients and follower, the parent's
    snapshot and ready slot, uvicorn on the parent's listening socket."""
    from services.cli.root import STARTUP_PATIENCE_S, Root

    def main(snap: Snapshot | None, sock: socket.socket, seat: Seat) -> None:
        import uvicorn

        from services.serving.graceful_server import GracefulServer, uvicorn_options

        sys.setswitchinterval(0.001)  # see serving_app_from_env
        app, follower = Root(settings, STARTUP_PATIENCE_S).serving_app()
        follower.seat = seat
        if snap is not None:
            follower.adopt(snap)
        follower.preload(PRELOAD_S)
        if follower.loading() is None and not seat.await_siblings(PRELOAD_S + 5.0):
            log.warning("serve: %d sibling workers still loading; accepting anyway", seat.others_waiting())
        config = uvicorn.Config(app, **uvicorn_options(cert, key))
        GracefulServer(config).run(sockets=[sock])

    return main


def serving_app_from_env() -> FastAPI:
    """One `encore serve` worker process (uvicorn's app factory): settings from ENCORE_*."""
    # The update follower thread shares the GIL with the event loop; make it hand over after
    # 1 ms rather than Python's default 5 ms, which would sit in every p99.
    from services.cli.root import STARTUP_PATIENCE_S, Root

    sys.setswitchinterval(0.001)
    settings = Settings.from_env()
    configure_logging(settings.log_level)  # worker processes start with logging unconfigured
    app, _ = Root(settings, STARTUP_PATIENCE_S).serving_app()
    return app
