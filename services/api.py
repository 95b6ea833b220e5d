"""`encore serve`: the HTTP API (FastAPI; OpenAPI at /docs)."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Literal

import orjson
import redis.asyncio as aioredis
from fastapi import FastAPI, HTTPException, Path, Query, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from pydantic import BaseModel, Field

from services.config import Settings, configure_logging
from services.metrics import watch_gc
from services.serving import ServingState, Snapshot

FIRST_MODEL_WAIT_S = 10.0
REQUESTS = Counter("encore_http_requests_total", "HTTP requests", ["route", "status"])
LATENCY = Histogram(
    "encore_http_seconds",
    "HTTP latency",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1),
)


class Item(BaseModel):
    track_id: str
    score: float


class Recommendations(BaseModel):
    user_id: str | None = None
    model_version: str
    source: Literal["personal", "popular"]
    items: list[Item]


class Similar(BaseModel):
    track_id: str
    model_version: str
    items: list[Item]


class Play(BaseModel):
    track_id: str = Field(min_length=1, max_length=256)
    count: float = Field(default=1.0, gt=0, le=1e6)


class AnonymousRequest(BaseModel):
    plays: list[Play] = Field(max_length=10_000)
    n: int = Field(default=10, ge=1)


class Metrics:
    """Pure ASGI middleware: request count and latency per route (no per-request task or copy)."""

    def __init__(self, app: Any) -> None:
        self.app = app

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
            REQUESTS.labels(route, str(status[0])).inc()
            LATENCY.labels(route).observe(time.perf_counter() - t0)


def create_app(settings: Settings, state: ServingState, follow: bool = True) -> FastAPI:
    """The API over `state`. Request handlers are async: Redis reads use one pipelined round
    trip on an asyncio client; index searches and anonymous fold-ins run inline (sub-millisecond);
    several worker processes (ENCORE_API_WORKERS) share the cores."""
    max_n = settings.max_n
    watch_gc()
    aio: dict[str, aioredis.Redis] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        aio["r"] = aioredis.Redis.from_url(settings.redis_url)  # bound to this event loop
        thread = None
        if follow:
            thread = threading.Thread(target=state.follow, daemon=True, name="serving-follower")
            thread.start()
        yield
        state.stop_event.set()
        if thread:
            thread.join(timeout=5)
        await aio.pop("r").aclose()

    app = FastAPI(
        title="Encore",
        version="0.1.0",
        lifespan=lifespan,
        description="Streaming music recommendations: implicit ALS + fold-in + HNSW.",
    )

    app.add_middleware(Metrics)  # type: ignore[arg-type]

    async def snapshot() -> Snapshot:
        """The current model. While this worker loads its first one (another worker may already
        answer, having built the snapshot this one now loads) a request waits for it, up to
        FIRST_MODEL_WAIT_S, rather than failing; with no model at all it gets a 503 at once."""
        waited = 0.0
        while state.snapshot is None and waited < FIRST_MODEL_WAIT_S and await aio["r"].exists(state.keys.current):
            await asyncio.sleep(0.05)  # published; this worker's follower is building or loading it
            waited += 0.05
        snap = state.snapshot
        if snap is None:
            raise HTTPException(503, detail="no model loaded yet; see /ready")
        return snap

    def check_n(n: int) -> None:
        if n > max_n:
            raise HTTPException(422, detail=f"n must be <= {max_n}")

    def popular(snap: Snapshot, n: int, exclude: Any) -> list[tuple[str, float]]:
        out = [t for t in snap.popular if t not in exclude][:n]
        return [(t, float(len(snap.popular) - i)) for i, t in enumerate(out)]

    def answer(body: dict[str, Any], items: list[tuple[str, float]]) -> Response:
        """The response body built as plain data and serialised by orjson: the hot routes skip
        Pydantic's re-validation of their own output (their models still document /docs)."""
        body["items"] = [{"track_id": t, "score": s} for t, s in items]
        return Response(orjson.dumps(body), media_type="application/json")

    @app.get("/recommendations/{user_id}", response_model=Recommendations)
    async def recommend(user_id: str = Path(min_length=1, max_length=256), n: int = Query(10, ge=1)) -> Response:
        check_n(n)
        snap = await snapshot()
        version = snap.loaded.version
        vec, played = await state.user_context(aio["r"], version, user_id)
        body: dict[str, Any] = {"user_id": user_id, "model_version": version}
        if vec is None or not vec.any():
            return answer({**body, "source": "popular"}, popular(snap, n, played))
        return answer({**body, "source": "personal"}, state.search(snap.ip, vec, n, played))

    @app.post("/recommendations", response_model=Recommendations)
    async def recommend_anonymous(req: AnonymousRequest) -> Response:
        check_n(req.n)
        snap = await snapshot()
        plays: dict[str, float] = {}
        for p in req.plays:
            plays[p.track_id] = plays.get(p.track_id, 0.0) + p.count
        vec = state.fold_in_plays(snap, plays)
        body: dict[str, Any] = {"user_id": None, "model_version": snap.loaded.version}
        if vec is None or not vec.any():
            return answer({**body, "source": "popular"}, popular(snap, req.n, plays))
        return answer({**body, "source": "personal"}, state.search(snap.ip, vec, req.n, plays))

    @app.get("/similar/{track_id}", response_model=Similar)
    async def similar(track_id: str = Path(min_length=1, max_length=256), n: int = Query(10, ge=1)) -> Response:
        check_n(n)
        snap = await snapshot()
        vec = state.track_vector(snap, track_id)
        if vec is None:
            raise HTTPException(404, detail=f"unknown track {track_id!r}")
        hits = state.search(snap.cosine, vec, n, [track_id])
        return answer({"track_id": track_id, "model_version": snap.loaded.version}, hits)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        snap = state.snapshot
        if snap is None:
            return JSONResponse({"ready": False, "reason": "no model loaded"}, status_code=503)
        body: dict[str, Any] = {"ready": True, "model_version": snap.loaded.version, "tracks": len(snap.ip)}
        body["index"] = {  # search breadth per index and, when it was chosen by measurement, the recall seen
            space: {
                "ef": idx.ef,
                "recall@10": snap.ef[space].recall if snap.ef else None,
                "recall@10_lower_95": snap.ef[space].lower if snap.ef else None,
            }
            for space, idx in (("ip", snap.ip), ("cosine", snap.cosine))
        }
        return JSONResponse(body)

    @app.get("/metrics")
    def prom() -> Response:
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:  # several workers: sum what all of them wrote
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def app_from_env() -> FastAPI:
    """One serving process: settings from ENCORE_*, its own ServingState (uvicorn's app factory)."""
    import redis

    # The update follower thread shares the GIL with the event loop; make it hand over after
    # 1 ms rather than Python's default 5 ms, which would sit in every p99.
    sys.setswitchinterval(0.001)
    settings = Settings.from_env()
    configure_logging(settings.log_level)  # worker processes start with logging unconfigured
    return create_app(settings, ServingState(settings, redis.Redis.from_url(settings.redis_url)))


@contextmanager
def metrics_dir() -> Iterator[None]:
    """Prometheus multiprocess mode for the worker processes spawned inside this block."""
    path = tempfile.mkdtemp(prefix="encore-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    try:
        yield
    finally:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        shutil.rmtree(path, ignore_errors=True)
