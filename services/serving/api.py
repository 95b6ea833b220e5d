"""`encore serve`: the HTTP API (FastAPI; OpenAPI at /docs), an edge over QueryService.

Domain errors become status codes here and only here: an unknown track 404, no model yet 503,
Redis unreachable or timing out 503 with Retry-After (a request never waits longer than the
client's one timeout policy allows).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

import redis
import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from pydantic import Field, create_model

from core.errors import UnknownVersionError
from core.filters import TrackFilter
from services.infra.lean_redis import LeanRedis
from services.infra.metrics import watch_gc
from services.infra.settings import Settings
from services.serving import catalogue_routes, dashboard, http_errors
from services.serving.auth import ApiAuth
from services.serving.catalogue_routes import TrackPublish
from services.serving.filter_params import filter_params
from services.serving.follower import UpdateFollower
from services.serving.hot_routes import Handler, HotBody, HotRoutes
from services.serving.http_errors import ADMIN, BODY, READ, TRACK, UNAUTHORIZED, BodyLimit
from services.serving.http_metrics import Metrics
from services.serving.http_models import (
    MAX_ID_LENGTH,
    Activated,
    AnonymousRequest,
    Forgotten,
    NotReady,
    Ready,
    Recommendations,
    Similar,
)
from services.serving.impressions import ImpressionLog
from services.serving.queries import QueryService
from services.serving.responses import answer, request_id


def create_app(
    settings: Settings,
    follower: UpdateFollower,
    redis_factory: Callable[[], aioredis.Redis],
    follow: bool = True,
    auth: ApiAuth | None = None,
    publish_track: TrackPublish | None = None,
    forget_user: Callable[[str], dict[str, Any]] | None = None,
    impressions: ImpressionLog | None = None,
    hot_routes: bool = True,
    lean_factory: Callable[[], LeanRedis | None] | None = None,
) -> FastAPI:
    """The API over `follower`'s snapshots; `follow` runs the follower on a thread for the
    app's lifetime (tests drive it by hand). Reads need a read or admin key and admin routes an
    admin key, once any key is configured (`auth`, from the settings when not given); /health,
    /ready and the OpenAPI pages stay open for probes and client generators. `publish_track`
    writes a catalogue entry to the `tracks` topic (admin hide/show). `hot_routes` answers plain
    personal and similar-track reads in front of FastAPI (`hot_routes`; off: FastAPI answers all).
    `lean_factory` gives the personal read's pipelined client (none: redis-py's, as elsewhere)."""
    max_n = settings.max_n
    auth = auth or ApiAuth.from_settings(settings)
    reader, admin = [Depends(auth.require_read)], [Depends(auth.require_admin)]
    filters = Depends(filter_params(max_n))
    explain_param = Query(False, description="add to each item the played tracks that contributed most")
    watch_gc()
    queries = QueryService(follower, follower.models.keys)
    aio: dict[str, aioredis.Redis] = {}
    leans: dict[str, LeanRedis | None] = {}

    def r() -> aioredis.Redis:
        """The asyncio client, made on first use in this event loop (making it may ask Redis
        whether it is a cluster: while Redis is unreachable that fails, and the request is a
        503 like any other Redis fault, rather than the app failing to start)."""
        if "r" not in aio:
            aio["r"] = redis_factory()
        return aio["r"]

    def lean() -> LeanRedis | None:
        """The hot read's client (`lean_redis`), made on first use like `r`; None without a
        factory or on a cluster."""
        if "r" not in leans:
            leans["r"] = lean_factory() if lean_factory is not None else None
        return leans["r"]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        thread = None
        if follow:
            thread = threading.Thread(target=follower.run, daemon=True, name="serving-follower")
            thread.start()
        yield
        follower.stop()
        if thread:
            thread.join(timeout=5)
        follower.close()
        if "r" in aio:
            await aio.pop("r").aclose()
        if (client := leans.pop("r", None)) is not None:
            client.close()

    app = FastAPI(
        title="Encore",
        version="0.1.0",
        lifespan=lifespan,
        description="Streaming music recommendations: implicit ALS + fold-in + HNSW.",
    )

    http_errors.install(app)
    request_model = create_model(  # the schema states the configured limit of n
        "AnonymousRequest", __base__=AnonymousRequest, n=(int, Field(default=10, ge=1, le=max_n))
    )

    @app.get("/recommendations/{user_id}", response_model=Recommendations, dependencies=reader, responses=READ)
    async def recommend(
        user_id: str = Path(min_length=1, max_length=MAX_ID_LENGTH),
        n: int = Query(10, ge=1, le=max_n),
        flt: TrackFilter = filters,
        explain: bool = explain_param,
    ) -> Response:
        return await personal(user_id, n, flt, explain)

    async def personal(user_id: str, n: int, flt: TrackFilter, explain: bool = False) -> Response:
        """The personal answer: the user's arm, vector and history, search, impression."""
        current = await queries.snapshot(r)
        arm, snap = follower.arms.assign(user_id, current)
        if snap is current:
            vec, played = await queries.user_context(r(), snap.version, user_id, explain, lean())
        else:  # another arm's version: the user folded in from the live history, per request
            _, played = await queries.user_context(r(), current.version, user_id, True, lean())
            vec = snap.fold_in_plays(played)
        source, items = queries.recommend(snap, vec, n, flt.excluding(played))
        reasons = _reasons(snap, source, played, items) if explain else None
        rid = request_id()
        if impressions is not None and items:
            impressions.record(rid, user_id, arm, snap.version, [t for t, _ in items])
        head = {"user_id": user_id, "model_version": snap.version, "source": source, "request_id": rid}
        return answer({**head, "arm": arm}, items, reasons)

    def _reasons(snap: Any, source: str, played: dict[str, float], items: Any) -> list[list[tuple[str, float]]]:
        """Why each item: exact contributions of the played tracks (none for the popular fallback)."""
        return queries.explain(snap, played, items) if source == "personal" else [[] for _ in items]

    async def recommend_anonymous(body: Any, flt: TrackFilter = filters, explain: bool = explain_param) -> Response:
        return await anonymous(body, flt, explain)

    async def anonymous(body: Any, flt: TrackFilter, explain: bool = False) -> Response:
        """An anonymous listener's answer: their plays folded in against the current model."""
        req = cast(AnonymousRequest, body)
        snap = await queries.snapshot(r)
        plays: dict[str, float] = {}
        for p in req.plays:
            plays[p.track_id] = plays.get(p.track_id, 0.0) + p.count
        source, items = queries.recommend(snap, snap.fold_in_plays(plays), req.n, flt.excluding(plays))
        reasons = _reasons(snap, source, plays, items) if explain else None
        head = {"user_id": None, "model_version": snap.version, "source": source, "request_id": request_id()}
        return answer({**head, "arm": "current"}, items, reasons)

    recommend_anonymous.__annotations__["body"] = request_model  # a class made here: no string annotation
    app.post("/recommendations", response_model=Recommendations, dependencies=reader, responses=BODY)(
        recommend_anonymous
    )

    @app.get("/similar/{track_id}", response_model=Similar, dependencies=reader, responses=TRACK)
    async def similar(
        track_id: str = Path(min_length=1, max_length=MAX_ID_LENGTH),
        n: int = Query(10, ge=1, le=max_n),
        flt: TrackFilter = filters,
    ) -> Response:
        """Tracks nearest `track_id` by cosine; a track taken down (unavailable) is a 404 here."""
        return await similar_to(track_id, n, flt)

    async def similar_to(track_id: str, n: int, flt: TrackFilter) -> Response:
        snap = await queries.snapshot(r)
        hits = queries.similar(snap, track_id, n, flt)
        head = {"track_id": track_id, "model_version": snap.version, "request_id": request_id()}
        return answer({**head, "arm": "current"}, hits)

    if hot_routes:  # innermost of the middlewares: metrics and the body limit still see every request
        routes = {getattr(x, "path", ""): x for x in app.routes}
        handlers: dict[str, tuple[Handler, Any]] = {
            "recommendations": (personal, routes["/recommendations/{user_id}"]),
            "similar": (similar_to, routes["/similar/{track_id}"]),
        }
        anon = HotBody(anonymous, routes["/recommendations"], request_model)
        app.add_middleware(HotRoutes, auth=auth, max_n=max_n, handlers=handlers, anonymous=anon)  # type: ignore[arg-type]
    catalogue_routes.install(app, settings, queries, r, reader, admin, publish_track)
    dashboard.install(app, settings, follower, auth)

    app.add_middleware(BodyLimit)  # type: ignore[arg-type]
    app.add_middleware(Metrics)  # type: ignore[arg-type]

    @app.delete("/admin/users/{user_id}", response_model=Forgotten, dependencies=admin, responses=ADMIN)
    async def forget(user_id: str = Path(min_length=1, max_length=MAX_ID_LENGTH)) -> Forgotten:
        """Right to erasure: history, vectors in every kept version, listener entries and queued
        work deleted at once; plays made before this request are never applied, later ones start
        a new history (README: forgetting a user)."""
        if forget_user is None:
            raise HTTPException(503, "this replica cannot record erasures")
        erased = await asyncio.to_thread(forget_user, user_id)
        return Forgotten(**erased)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", responses={200: {"model": Ready}, 503: {"model": NotReady, "headers": http_errors.RETRY_HEADER}})
    async def ready() -> JSONResponse:
        snap, reason = follower.snapshot, follower.loading()
        if reason is None and (waiting := follower.siblings_loading()):
            reason = f"{waiting} other worker(s) of this server still loading"  # one probe speaks for all
        if snap is None or reason is not None:
            retry = {} if snap is None or follower.failure else {"Retry-After": "1"}
            return JSONResponse({"ready": False, "reason": reason}, 503, headers=retry)
        try:
            await r().ping()  # bounded by ENCORE_REDIS_TIMEOUT_S like every Redis call
        except (redis.RedisError, OSError) as exc:
            reason = f"Redis unreachable: {type(exc).__name__}: {exc}"
            return JSONResponse({"ready": False, "reason": reason}, 503, headers={"Retry-After": "1"})
        body: dict[str, Any] = {"ready": True, "model_version": snap.version, "tracks": len(snap.ip)}
        body["index"] = dashboard.index_info(snap)
        return JSONResponse(body)

    @app.post("/admin/models/{version}/activate", response_model=Activated, dependencies=admin, responses=ADMIN)
    async def activate(version: str = Path(min_length=1, max_length=MAX_ID_LENGTH)) -> Activated:
        """Make a kept version current, as `encore model rollback VERSION` does; every replica
        follows within its next refresh."""
        models = follower.models
        previous = await asyncio.to_thread(models.current_version)
        try:
            await asyncio.to_thread(models.flip, version)
        except UnknownVersionError as exc:
            raise HTTPException(404, str(exc)) from None
        return Activated(current=version, previous=previous)

    @app.get(
        "/metrics",
        dependencies=reader,
        response_class=PlainTextResponse,
        responses={**UNAUTHORIZED, 200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
    )
    def prom() -> Response:
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:  # several workers: sum what all of them wrote
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
