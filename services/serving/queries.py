"""The query side of a serving replica: reads the follower's current snapshot, never writes it.

Searches run on the calling (event-loop) thread under the follower's read lock: handing each
search to a query thread cost more than the search (at 500 requests/s serve used 0.72 cores
with two query threads and 0.50 inline, bench/serving). Parallelism comes from worker
processes instead (ENCORE_API_WORKERS). Every answer passes the catalogue filter
(`core.filters`): unavailable tracks never appear, whatever the route.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable

import numpy as np
import redis.asyncio as aioredis

from core.artists import ArtistSpace, blend, playlist
from core.catalogue import Catalogue
from core.errors import NoModelError, UnknownTrackError
from core.explain import explain, top_reasons
from core.filter_plans import FilterPlans, planned_search
from core.filters import Choose, Ranked, TrackFilter, passing, pick
from core.messages import decode_vector
from core.recommend import normalize_rows
from services.infra.keys import Keys
from services.infra.lean_redis import LeanRedis
from services.serving.follower import UpdateFollower
from services.serving.snapshots import Snapshot

FIRST_MODEL_WAIT_S = 10.0
ARTISTS_MAX_AGE_S = 60.0  # artist vectors follow catalogue changes at most this late
REASONS_PER_ITEM = 3


class QueryService:
    def __init__(self, follower: UpdateFollower, keys: Keys) -> None:
        self.follower, self.keys = follower, keys
        self._artists: tuple[tuple[int, int], float, ArtistSpace] | None = None
        self.plans = FilterPlans()  # exact subsets of narrow filters (core.filter_plans)

    @property
    def catalogue(self) -> Catalogue:
        return self.follower.catalogue

    async def snapshot(self, r: Callable[[], aioredis.Redis]) -> Snapshot:
        """The current model. While this worker loads its first one (another worker may already
        answer, having built the snapshot this one now loads) a request waits for it, up to
        FIRST_MODEL_WAIT_S, rather than failing; with no model published it fails at once. `r`
        gives the Redis client, asked for only while waiting (an answer from the snapshot alone,
        like an anonymous one, needs no Redis)."""
        waited = 0.0
        while self.follower.snapshot is None and waited < FIRST_MODEL_WAIT_S and await r().exists(self.keys.current):
            await asyncio.sleep(0.05)
            waited += 0.05
        snap = self.follower.snapshot
        if snap is None:
            raise NoModelError("no model loaded yet; see /ready")
        return snap

    async def user_context(
        self,
        r: aioredis.Redis,
        version: str,
        user_id: str,
        weights: bool = False,
        lean: LeanRedis | None = None,
    ) -> tuple[np.ndarray | None, dict[str, float]]:
        """A user's vector in `version` and the tracks they played (with their weights when
        asked; 0 otherwise), in one round trip; through `lean` (`services.infra.lean_redis`)
        when given, a third of redis-py's CPU for the hot read."""
        vector_key, history_key = self.keys.user(version, user_id), self.keys.history(user_id)
        if lean is not None:
            raw, played = await lean.execute(("GET", vector_key), ("HGETALL" if weights else "HKEYS", history_key))
            if weights:  # RESP2: a flat list of field, value
                played = dict(zip(played[::2], played[1::2], strict=True))
        else:
            async with r.pipeline(transaction=False) as pipe:
                pipe.get(vector_key)
                if weights:
                    pipe.hgetall(history_key)
                else:
                    pipe.hkeys(history_key)
                raw, played = await pipe.execute()
        vec = None if raw is None else decode_vector(raw)
        if weights:
            return vec, {t.decode(): float(w) for t, w in played.items()}
        return vec, dict.fromkeys((t.decode() for t in played), 0.0)

    def search(
        self, snap: Snapshot, space: str, vec: np.ndarray, n: int, flt: TrackFilter, choose: Choose | None = None
    ) -> Ranked:
        index = snap.ip if space == "ip" else snap.cosine
        with self.follower.lock.read():
            return planned_search(index, vec, n, flt, self.catalogue, self.plans, choose)

    def recommend(self, snap: Snapshot, vec: np.ndarray | None, n: int, flt: TrackFilter) -> tuple[str, Ranked]:
        """(source, items): personal by inner product when there is a non-zero vector, else the
        popular fallback; both obey `flt` (which holds the played tracks to leave out)."""
        if vec is None or not vec.any():
            return "popular", self.popular(snap, n, flt)
        return "personal", self.search(snap, "ip", vec, n, flt)

    def track_vector(self, snap: Snapshot, track_id: str) -> np.ndarray:
        """A served track's vector; an unknown or unavailable track is an UnknownTrackError."""
        if not self.catalogue.available(track_id):
            raise UnknownTrackError(f"track {track_id!r} is not available")
        with self.follower.lock.read():
            vec = snap.ip.vector(track_id)
        if vec is None:
            raise UnknownTrackError(f"unknown track {track_id!r}")
        return vec

    def similar(self, snap: Snapshot, track_id: str, n: int, flt: TrackFilter) -> Ranked:
        vec = self.track_vector(snap, track_id)
        return self.search(snap, "cosine", vec, n, flt.excluding([track_id]))

    def popular(self, snap: Snapshot, n: int, flt: TrackFilter) -> Ranked:
        return pick(snap.popular, n, flt, self.catalogue)

    def explain(self, snap: Snapshot, history: dict[str, float], items: Ranked) -> list[list[tuple[str, float]]]:
        """Per item, the played tracks that contributed most to its score (`core.explain`)."""
        with self.follower.lock.read():
            known = [(t, w, v) for t, w in history.items() if w > 0 and (v := snap.ip.vector(t)) is not None]
            item_vecs = [snap.ip.vector(t) for t, _ in items]
        if not known or not items:
            return [[] for _ in items]
        played = np.stack([v for _, _, v in known])
        Yi = np.stack([v if v is not None else np.zeros(played.shape[1], np.float32) for v in item_vecs])
        weights = np.array([w for _, w, _ in known])
        _, contributions = explain(snap.loaded.model, snap.loaded.item_gram, played, weights, Yi)
        return top_reasons([t for t, _, _ in known], contributions, REASONS_PER_ITEM)

    # ---- artists and radio -------------------------------------------------------------
    def artists(self, snap: Snapshot) -> ArtistSpace:
        """Artist vectors of the current version and catalogue (rebuilt on a new version, or when
        the catalogue changed and the last build is older than ARTISTS_MAX_AGE_S)."""
        stamp = (id(snap), self.catalogue.changes)
        cached = self._artists
        fresh = cached is not None and cached[0][0] == stamp[0]
        if cached is not None and fresh and (cached[0] == stamp or time.monotonic() - cached[1] < ARTISTS_MAX_AGE_S):
            return cached[2]
        loaded, catalogue = snap.loaded, self.catalogue
        shares = loaded.popularity
        rows = loaded.track_index
        factors = loaded.model.item_factors_

        def vectors(tracks: list[str]) -> np.ndarray:
            """The model's factors where it has them, else the graph's (tracks folded in since)."""
            out = np.zeros((len(tracks), snap.ip.dim), dtype=np.float32)
            for j, t in enumerate(tracks):
                i = rows.get(t)
                if i is not None:
                    out[j] = factors[i]
                else:
                    with self.follower.lock.read():
                        v = snap.ip.vector(t)
                    if v is not None:
                        out[j] = v
            return out

        def weight(track: str) -> float:
            i = rows.get(track)
            return float(shares[i]) if i is not None and i < len(shares) else 0.0

        available = {a: [t for t in ts if catalogue.available(t)] for a, ts in catalogue.artists().items()}
        space = ArtistSpace({a: ts for a, ts in available.items() if ts}, vectors, weight)
        self._artists = (stamp, time.monotonic(), space)
        return space

    def radio(
        self,
        snap: Snapshot,
        seeds: list[np.ndarray],
        listener: np.ndarray | None,
        n: int,
        flt: TrackFilter,
        window: int,
        listener_weight: float,
    ) -> Ranked:
        """A playlist near the seeds together (and the listener): `core.artists.playlist` over the
        filtered cosine ranking, no artist twice within `window` tracks; with no seed, over the
        popular fallback."""
        choose = functools.partial(playlist, window=window, artist_of=self.catalogue.artist_of)
        if not seeds:
            return choose(passing(snap.popular, flt, self.catalogue), n)
        q = blend(sum(normalize_rows(np.atleast_2d(s))[0] for s in seeds), listener, listener_weight)
        return self.search(snap, "cosine", q, n, flt, choose=choose)
