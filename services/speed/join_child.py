"""The experiment join beside `encore foldin`, in a process of its own (`encore join`).

The join reads and decodes every play a second time. On the worker's interpreter that cost the
fold-in a fifth of its throughput (one GIL: 37,400-38,700 plays/s with the join on a thread,
42,900-47,900 without it, `bench.freshness`); in a child process it runs on the other core.
The join has its own consumer group and its own fences in Redis, so nothing couples the two
processes but their lifetimes: the child dies with the worker (PR_SET_PDEATHSIG, a kill -9
too), a child that dies alone is started again after a back-off, and the per-arm gauges are
exported here, where `ENCORE_METRICS_PORT` is served, from the counts the child keeps in Redis.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping

import redis

from services.infra.embedded import spawn
from services.infra.experiment_metrics import export_arm_gauges
from services.infra.keys import Keys
from services.infra.lifecycle import Backoff

log = logging.getLogger(__name__)
WATCH_EVERY_S = 1.0
EXPORT_EVERY_S = 5.0
HEALTHY_AFTER_S = 60.0  # a child that ran this long starts again after the shortest back-off
STOP_PATIENCE_S = 15.0


class JoinChild:
    """Component: `run` keeps one `encore join` child alive until `stop`; `close` waits for it."""

    def __init__(self, r: redis.Redis, keys: Keys, env: Mapping[str, str] | None = None) -> None:
        self.r, self.keys = r, keys
        # the child serves no metrics of its own: its gauges are exported here
        self.env = {**(os.environ if env is None else env), "ENCORE_METRICS_PORT": "0"}
        self.stop_event = threading.Event()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._started_at = self._exported_at = 0.0

    def _start(self) -> None:
        self.proc = spawn([sys.executable, "-m", "services.cli", "join"], None, self.env, own_session=True)
        self.starts += 1
        self._started_at = time.monotonic()
        log.info("experiment join started in process %d", self.proc.pid)

    def run(self) -> None:
        backoff = Backoff(first=1.0, cap=30.0)
        self._start()
        while not self.stop_event.wait(WATCH_EVERY_S):
            assert self.proc is not None
            code = self.proc.poll()
            if code is not None:
                log.error(
                    "the experiment join process exited with code %s; starting it again in %.0fs", code, backoff.delay
                )
                backoff.wait(self.stop_event)
                if not self.stop_event.is_set():
                    self._start()
            elif time.monotonic() - self._started_at > HEALTHY_AFTER_S:
                backoff.reset()
            if time.monotonic() - self._exported_at >= EXPORT_EVERY_S:
                self._exported_at = time.monotonic()
                self._export()

    def _export(self) -> None:
        try:
            export_arm_gauges(self.r, self.keys)
        except redis.RedisError as exc:  # the next export tries again
            log.warning("per-arm gauges not exported: %s", exc)

    def stop(self) -> None:
        """Ask the child to end after its current poll (signal-handler safe)."""
        self.stop_event.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def close(self) -> None:
        """Wait for the child to leave its group; kill it if it does not."""
        if self.proc is None:
            return
        self.stop()
        try:
            self.proc.wait(STOP_PATIENCE_S)
        except subprocess.TimeoutExpired:
            log.warning("the experiment join process did not stop in %.0fs; killing it", STOP_PATIENCE_S)
            self.proc.kill()
            self.proc.wait()
