"""The fold-in worker's second thread: re-solves queued users while the next batch is applied.

A batch's time was mostly spent waiting: on Redis running the Lua apply, then on Python solving
the users, one after the other on a machine whose other core sat idle. The queue of users to
re-solve is durable in the store and written in the same atomic step as the histories, so the
re-solve needs no ordering with the apply beyond "after": this thread drains it while the
worker's loop polls, decodes and applies the next batch. When it falls behind (a step took a full
`limit` of users), the loop waits for one step per batch, as the one-thread loop did, so the
queue, and with it the staleness of vectors, stays bounded.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from services.infra import metrics
from services.infra.lifecycle import Backoff, retry_step
from services.speed.pipeline import PENDING_PER_STEP, SpeedLayer

log = logging.getLogger(__name__)
IDLE_CHECK_S = 1.0  # queued work from elsewhere (a catch-up, another worker's crash) is seen this soon


class ResolverThread:
    """`start`, `poke` after every applied batch, `wait_if_behind` before the next, `stop`."""

    def __init__(self, layer: SpeedLayer, stop: threading.Event, on_fatal: Callable[[BaseException], None]) -> None:
        self.layer, self.stop_event, self.on_fatal = layer, stop, on_fatal
        self._cond = threading.Condition()
        self._poked = False
        self._steps = 0  # re-solve steps completed
        self._seen = 0  # `_steps` when the loop last went on past a full step
        self._behind = False
        self._thread = threading.Thread(target=self._run, name="encore-resolver", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def poke(self) -> None:
        """A batch was applied: its users are queued."""
        with self._cond:
            self._poked = True
            self._cond.notify_all()

    def wait_if_behind(self) -> None:
        """Block while the last step was full and none finished since the last call."""
        with self._cond:
            while self._behind and self._steps == self._seen and self._thread.is_alive():
                if self.stop_event.is_set():
                    return
                self._cond.wait(0.1)
            self._seen = self._steps

    def _step(self) -> None:
        users, tracks = self.layer.resolve_pending(PENDING_PER_STEP)
        metrics.USERS_FOLDED.inc(users)
        metrics.TRACKS_FOLDED.inc(tracks)
        with self._cond:
            self._steps += 1
            self._behind = self.layer.last_full
            self._cond.notify_all()

    def _run(self) -> None:
        backoff = Backoff()
        try:
            while not self.stop_event.is_set():
                with self._cond:
                    if not self._behind and not self._poked:
                        self._cond.wait(IDLE_CHECK_S)
                    self._poked = False
                retry_step(self._step, self.stop_event, "re-solve step", backoff, metrics.RETRIES.inc)
        except BaseException as exc:  # noqa: BLE001 - handed to the worker, which stops loudly
            self.error = exc
            self.on_fatal(exc)
        finally:
            with self._cond:
                self._cond.notify_all()

    def join(self, timeout: float = 30.0) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the re-solve thread did not end within %.0fs", timeout)
