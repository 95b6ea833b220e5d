"""Per-route request counts and latency for Prometheus, as a pure ASGI middleware."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import Counter, Histogram

REQUESTS = Counter("encore_http_requests_total", "HTTP requests", ["route", "status"])
LATENCY = Histogram(
    "encore_http_seconds",
    "HTTP latency",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1),
)


class Metrics:
    """Pure ASGI middleware: request count and latency per route (no per-request task or copy)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.series: dict[tuple[str, int], tuple[Any, Any]] = {}  # (route, status) → (counter, histogram)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]

        async def send_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            key = (route, status[0])
            series = self.series.get(key)
            if series is None:  # `labels()` takes a lock and builds its key each time: keep the children
                series = self.series[key] = (REQUESTS.labels(route, str(status[0])), LATENCY.labels(route))
            series[0].inc()
            series[1].observe(time.perf_counter() - t0)
