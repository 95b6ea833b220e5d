"""Routes built on the catalogue: related artists, radio, and the admin takedown switch."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, HTTPException, Path, Query
from fastapi.responses import Response

from core.catalogue import TrackInfo
from core.errors import UnknownTrackError
from core.filters import TrackFilter
from services.infra.settings import Settings
from services.serving.filter_params import filter_params
from services.serving.http_errors import ADMIN, READ
from services.serving.http_models import MAX_ID_LENGTH, Error, Radio, SimilarArtists, TrackState
from services.serving.queries import QueryService
from services.serving.responses import answer

TrackPublish = Callable[[str, TrackInfo], None]
ARTIST = {**READ, 404: {"model": Error, "description": "no artist with tracks in the current model"}}
RADIO = {**READ, 404: {"model": Error, "description": "a seed track or artist is unknown or unavailable"}}


def install(
    app: FastAPI,
    settings: Settings,
    queries: QueryService,
    r: Callable[[], aioredis.Redis],
    reader: list[Any],
    admin: list[Any],
    publish_track: TrackPublish | None,
) -> None:
    max_n = settings.max_n
    filters = Depends(filter_params(max_n))

    @app.get("/similar-artists/{artist_id}", response_model=SimilarArtists, dependencies=reader, responses=ARTIST)
    async def similar_artists(
        artist_id: str = Path(min_length=1, max_length=MAX_ID_LENGTH), n: int = Query(10, ge=1, le=max_n)
    ) -> Response:
        """Artists nearest `artist_id`: cosine of listener-weighted mean track vectors (README)."""
        snap = await queries.snapshot(r)
        space = await asyncio.to_thread(queries.artists, snap)
        if space.vector(artist_id) is None:
            raise HTTPException(404, f"unknown artist {artist_id!r} (no available track of it in the model)")
        items = [{"artist_id": a, "score": s} for a, s in space.similar(artist_id, n)]
        return SimilarArtists.model_validate({"artist_id": artist_id, "model_version": snap.version, "items": items})  # type: ignore[return-value]

    @app.get("/radio", response_model=Radio, dependencies=reader, responses=RADIO)
    async def radio(
        seed_track: str = Query("", max_length=MAX_ID_LENGTH, description="a track to start from"),
        seed_artist: str = Query("", max_length=MAX_ID_LENGTH, description="an artist to start from"),
        user: str = Query(
            "", max_length=MAX_ID_LENGTH, description="the listener (their taste, their tracks left out)"
        ),
        n: int = Query(50, ge=1, le=max_n),
        flt: TrackFilter = filters,
    ) -> Response:
        """A playlist near the seeds (the track's, the artist's, or both together) and the
        listener, when `user` is given: no artist twice within ENCORE_RADIO_ARTIST_WINDOW tracks,
        none of the listener's played tracks, the seed track itself left out, the same filters as
        every route. With no seed, the listener's own taste seeds it; with neither, what is
        popular (README: radio)."""
        snap = await queries.snapshot(r)
        seeds, label = [], []
        if seed_track:
            seeds.append(queries.track_vector(snap, seed_track))
            label.append(f"track:{seed_track}")
            flt = flt.excluding([seed_track])
        if seed_artist:
            space = await asyncio.to_thread(queries.artists, snap)
            vec = space.vector(seed_artist)
            if vec is None:
                raise UnknownTrackError(f"unknown artist {seed_artist!r} (no available track of it in the model)")
            seeds.append(vec)
            label.append(f"artist:{seed_artist}")
        listener = None
        if user:
            listener, played = await queries.user_context(r(), snap.version, user)
            flt = flt.excluding(played)
        if not seeds and listener is not None and listener.any():
            seeds, label, listener = [listener], [f"user:{user}"], None
        window, pull = settings.radio_artist_window, settings.radio_listener_weight
        items = queries.radio(snap, seeds, listener, n, flt, window, pull)
        body = {"seed": "+".join(label) or "popular", "user_id": user or None, "model_version": snap.version}
        return answer(body, items)

    async def set_available(track_id: str, available: bool) -> TrackState:
        if publish_track is None:
            raise HTTPException(503, "this replica has no catalogue topic to write to")
        current = queries.catalogue.get(track_id) or TrackInfo(track_id)
        info = current.with_available(available)
        await asyncio.to_thread(publish_track, track_id, info)  # durable (acknowledged) before we answer
        queries.catalogue.put(info)  # this replica at once; the others within their next poll
        return TrackState(track_id=track_id, available=available)

    @app.post("/admin/tracks/{track_id}/hide", response_model=TrackState, dependencies=admin, responses=ADMIN)
    async def hide(track_id: str = Path(min_length=1, max_length=MAX_ID_LENGTH)) -> TrackState:
        """Take a track down: `available: false` in the catalogue; gone from every answer of every
        replica within a second, and /similar/{track_id} answers 404."""
        return await set_available(track_id, False)

    @app.post("/admin/tracks/{track_id}/show", response_model=TrackState, dependencies=admin, responses=ADMIN)
    async def show(track_id: str = Path(min_length=1, max_length=MAX_ID_LENGTH)) -> TrackState:
        """Undo a takedown: `available: true` in the catalogue."""
        return await set_available(track_id, True)
