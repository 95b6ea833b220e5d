"""The query side of a serving replica: reads the follower's current snapshot, never writes it.

Searches run on the calling (event-loop) thread under the follower's read lock: handing each
search to a query thread cost more than the search (at 500 requests/s serve used 0.72 cores
with two query threads and 0.50 inline, bench/serving). Parallelism comes from worker
processes instead (ENCORE_API_WORKERS).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from typing import Any

import numpy as np
import redis.asyncio as aioredis

from core.errors import NoModelError, UnknownTrackError
from core.index import HNSWIndex
from core.messages import decode_vector
from services.infra.keys import Keys
from services.serving.follower import UpdateFollower
from services.serving.snapshots import Snapshot

FIRST_MODEL_WAIT_S = 10.0


class QueryService:
    def __init__(self, follower: UpdateFollower, keys: Keys) -> None:
        self.follower, self.keys = follower, keys

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

    async def user_context(self, r: aioredis.Redis, version: str, user_id: str) -> tuple[np.ndarray | None, set[str]]:
        """A user's vector in `version` and the tracks they played, in one round trip."""
        async with r.pipeline(transaction=False) as pipe:
            pipe.get(self.keys.user(version, user_id))
            pipe.hkeys(self.keys.history(user_id))
            raw, played = await pipe.execute()
        return (None if raw is None else decode_vector(raw)), {t.decode() for t in played}

    def search(
        self, index: HNSWIndex, vec: np.ndarray, n: int, exclude: Collection[str] = ()
    ) -> list[tuple[str, float]]:
        with self.follower.lock.read():
            return index.query(vec, n, exclude=exclude)

    def recommend(
        self, snap: Snapshot, vec: np.ndarray | None, n: int, exclude: Collection[str]
    ) -> tuple[str, list[tuple[str, float]]]:
        """(source, items): personal by inner product when there is a non-zero vector, else the
        popular fallback; `exclude` (played tracks) is left out either way."""
        if vec is None or not vec.any():
            return "popular", self.popular(snap, n, exclude)
        return "personal", self.search(snap.ip, vec, n, exclude)

    def similar(self, snap: Snapshot, track_id: str, n: int) -> list[tuple[str, float]]:
        with self.follower.lock.read():
            vec = snap.cosine.vector(track_id)
        if vec is None:
            raise UnknownTrackError(f"unknown track {track_id!r}")
        return self.search(snap.cosine, vec, n, [track_id])

    @staticmethod
    def popular(snap: Snapshot, n: int, exclude: Collection[Any]) -> list[tuple[str, float]]:
        return [(t, score) for t, score in snap.popular if t not in exclude][:n]
