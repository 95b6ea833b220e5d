"""Prometheus metrics of the workers and the API (one registry per process)."""

from __future__ import annotations

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


def serve_metrics(port: int) -> None:
    """Expose /metrics on `port` in a background thread (0 = off)."""
    if port:
        start_http_server(port, addr="127.0.0.1")
