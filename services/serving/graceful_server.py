"""uvicorn's server with a gentler exit for a serve worker that is retired: on SIGTERM it stops
accepting at once, answers what it had already accepted for `LINGER_S`, and only then runs
uvicorn's own shutdown.

Why: uvicorn, at its next tick after SIGTERM (up to 0.1 s later), closes its listener and, in the
same step, every connection with no request in progress. A connection the kernel handed to the
worker just before that step, whose request was still on its way, was closed unanswered. During
a version roll (the old generation is stopped once the new one is forked on the same socket) a
client that opened a connection at that moment got no response at all, although a worker of
the new generation was ready to answer. Here the listener closes as soon as the signal arrives
(the kernel then hands new connections to the other workers), and a connection accepted before
that gets its requests answered during the linger. Idle keep-alive connections are closed at
the end, as before: an HTTP client resends an idempotent request on a reused connection that the
server closed (RFC 9112, 9.3.1), and this one lands on a worker that is not leaving.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from types import FrameType
from typing import Any

import uvicorn

LINGER_S = 1.0


class GracefulServer(uvicorn.Server):
    """`uvicorn.Server` whose first SIGTERM stops accepting now and exits `linger_s` later."""

    def __init__(self, config: uvicorn.Config, linger_s: float = LINGER_S) -> None:
        super().__init__(config)
        self.linger_s = linger_s
        self.retiring_since: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM or self.retiring_since is not None or self._loop is None or self.linger_s <= 0:
            super().handle_exit(sig, frame)  # SIGINT, a second SIGTERM, or before startup: uvicorn's way
            return
        self._captured_signals.append(sig)  # uvicorn re-raises it after its shutdown, as it would have
        self.retiring_since = time.monotonic()
        self._loop.call_soon_threadsafe(self._stop_accepting)  # a signal handler: hand over to the loop

    def _stop_accepting(self) -> None:
        for server in getattr(self, "servers", []):
            server.close()  # this process's copy of the listening socket; uvicorn's close later is a no-op

    async def on_tick(self, counter: int) -> bool:
        if self.retiring_since is not None and time.monotonic() - self.retiring_since >= self.linger_s:
            self.should_exit = True
        return await super().on_tick(counter)


def uvicorn_options(cert: str | None, key: str | None) -> dict[str, Any]:
    """What every `encore serve` process passes to uvicorn. access_log=False: at level warning
    nothing is logged, yet uvicorn formats each request's path for the access logger unless it
    has no handler."""
    return {"log_level": "warning", "access_log": False, "ssl_certfile": cert, "ssl_keyfile": key}
