"""Prometheus metrics of the workers and the API (one registry per process)."""

from __future__ import annotations

import gc
import os
import threading
import time
from collections import deque
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

EVENTS_IN = Counter("encore_events_in_total", "play messages consumed")
EVENTS_APPLIED = Counter("encore_events_applied_total", "play messages applied to histories")
EVENTS_SKIPPED = Counter("encore_events_replayed_total", "messages skipped as already applied")
DEAD_LETTERS = Counter("encore_dead_letters_total", "messages sent to the dead-letter topic")
USERS_FOLDED = Counter("encore_users_folded_total", "user vectors re-solved")
TRACKS_FOLDED = Counter("encore_tracks_folded_total", "cold-start track vectors solved")
BATCH_SECONDS = Histogram(
    "encore_foldin_batch_seconds",
    "micro-batch latency, poll to commit",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
LAG = Gauge("encore_consumer_lag", "messages behind the end of the plays topic")
RETRIES = Counter("encore_retries_total", "batches retried after a Redis or broker error")
STATE_REWINDS = Counter(
    "encore_state_rewinds_total", "partitions rewound because Redis lost applied writes (replayed from Kafka)"
)
REPLAY_GAPS = Counter(
    "encore_replay_gaps_total", "partitions whose needed offsets Kafka no longer holds (plays lost for good)", ["group"]
)
OFFSET_GAPS = Counter(
    "encore_offset_gaps_total", "consumed batches that skipped offsets of a partition (cut there and fetched again)"
)
ARM_IMPRESSIONS = Gauge("encore_arm_impressions", "impressions joined so far, per arm", ["experiment", "arm"])
ARM_CONVERSION = Gauge(
    "encore_arm_conversion", "share of impressions followed by a play of a recommended track", ["experiment", "arm"]
)
ARM_PLAYS_PER_IMPRESSION = Gauge(
    "encore_arm_plays_per_impression", "plays of recommended tracks per impression", ["experiment", "arm"]
)
STAGE_SECONDS = Counter(
    "encore_foldin_stage_seconds", "fold-in time per stage of a micro-batch (see stage_timer)", ["stage"]
)
REDIS_OOM = Counter("encore_redis_oom_total", "Redis commands refused at maxmemory (retried, nothing written)")


GC_PAUSE = Histogram(
    "encore_gc_pause_seconds",
    "Python garbage-collector pauses, by generation",
    ["generation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
)
_gc_started = [0.0]
# (generation, seconds) of pauses not yet in GC_PAUSE. The collector's callback must not touch a
# metric itself: it runs inside whatever allocation set the collection off, and in multiprocess
# mode prometheus_client allocates (json.dumps of a new series' key) while holding its
# non-reentrant lock, so a callback that observes there waits for itself forever (a serve worker
# hung that way under load; tests/unit/test_gc_metrics.py). deque.append takes no lock.
_gc_pending: deque[tuple[int, float]] = deque(maxlen=100_000)
_gc_flusher_pid = [0]  # the process whose flusher thread runs (a forked child has none)
GC_FLUSH_S = 0.5


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _gc_started[0] = time.perf_counter()
    else:
        _gc_pending.append((info["generation"], time.perf_counter() - _gc_started[0]))


def flush_gc_pauses() -> None:
    """Move the recorded pauses into GC_PAUSE (outside any collector callback)."""
    while _gc_pending:
        generation, seconds = _gc_pending.popleft()
        GC_PAUSE.labels(str(generation)).observe(seconds)


def _flush_forever() -> None:
    while True:
        time.sleep(GC_FLUSH_S)
        flush_gc_pauses()


def watch_gc() -> None:
    """Time every collector pause into GC_PAUSE (every thread stops while it runs): recorded by
    the callback, observed by a daemon thread of this process every GC_FLUSH_S."""
    if _on_gc not in gc.callbacks:
        gc.callbacks.append(_on_gc)
    if _gc_flusher_pid[0] != os.getpid():
        _gc_flusher_pid[0] = os.getpid()
        threading.Thread(target=_flush_forever, daemon=True, name="gc-pause-metrics").start()


def serve_metrics(port: int) -> None:
    """Expose /metrics on `port` in a background thread (0 = off)."""
    if port:
        start_http_server(port, addr="127.0.0.1")
