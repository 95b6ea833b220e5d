"""Model versions in Redis: publish (write all vectors, then flip), load, read and write vectors.

`RedisModelStore` is the Redis side of the speed layer's ModelStore port and what the trainer,
serving and the CLI use to reach versions; keys come from `Keys` only.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Collection, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import orjson
import redis
from redis.cluster import RedisCluster

from core.als import ImplicitALS
from core.errors import CorruptFileError, UnknownVersionError
from core.messages import decode_vector, encode_vector, encode_vectors
from core.version_meta import version_meta
from services.infra.checked_files import read_npz
from services.infra.cluster_io import mget_per_node, mset_per_node
from services.infra.keys import Keys

log = logging.getLogger(__name__)
CHUNK = 5000
BINARY_META = (b"user_gram", b"query_sample", b"popularity")  # meta fields that are arrays, not text


@dataclass
class LoadedModel:
    """What the speed layer and serving need of one version."""

    version: str
    model: ImplicitALS
    track_ids: list[str]
    user_gram: np.ndarray
    meta: dict[str, str]
    track_index: dict[str, int] = field(default_factory=dict)
    track_index_b: dict[bytes, int] = field(default_factory=dict)  # same, keyed by Redis bytes
    item_gram: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # YᵀY, float64
    query_sample: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # user vectors
    popularity: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # share per factor row

    def __post_init__(self) -> None:
        if not self.track_index:
            self.track_index = {t: i for i, t in enumerate(self.track_ids)}
        if not self.track_index_b:
            self.track_index_b = {t.encode(): i for t, i in self.track_index.items()}
        if self.item_gram.size == 0 and hasattr(self.model, "item_factors_"):
            y = self.model.item_factors_.astype(np.float64)
            self.item_gram = y.T @ y


def new_version() -> str:
    return (
        time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{os.getpid() % 1000:03d}{int(time.time() * 1000) % 1000:03d}"
    )


class RedisModelStore:
    """Versions, their meta and their vectors under one key prefix."""

    def __init__(self, r: redis.Redis, keys: Keys) -> None:
        self.r, self.keys = r, keys
        self._cluster = isinstance(r, RedisCluster)

    def _mset(self, mapping: Mapping[str, bytes]) -> None:
        """One MSET; on a cluster one per slot, one pipeline per node, the nodes in parallel."""
        if self._cluster:
            mset_per_node(cast(RedisCluster, self.r), mapping)
        else:
            self.r.mset(dict(mapping))

    def _mget(self, keys: list[str]) -> list[bytes | None]:
        if self._cluster:
            return mget_per_node(cast(RedisCluster, self.r), keys)
        return self.r.mget(keys)  # type: ignore[no-any-return]

    # ---- versions ------------------------------------------------------------------
    def current_version(self) -> str | None:
        v = self.r.get(self.keys.current)
        return v.decode() if v else None

    def versions(self) -> list[tuple[str, float]]:
        """(version, publish time) of every kept version, oldest first."""
        return [(v.decode(), float(t)) for v, t in self.r.zrange(self.keys.versions, 0, -1, withscores=True)]

    def kept_versions(self) -> list[str]:
        """Every version whose keys may still be read: those listed, and the current one."""
        current = self.current_version()
        listed = [v for v, _ in self.versions()]
        return listed + ([current] if current is not None and current not in listed else [])

    def record_erasure(self, user: str, at: float) -> None:
        self.r.zadd(self.keys.erasures, {user: at})

    def erased_since(self, t: float) -> set[str]:
        """Users erased at or after Redis server time `t`."""
        return {u.decode() for u in self.r.zrangebyscore(self.keys.erasures, t, "+inf")}

    def delete_user_vectors(self, version: str, users: Collection[str]) -> None:
        if users:
            pipe = self.r.pipeline(transaction=False)
            for u in users:
                pipe.delete(self.keys.user(version, u))
            pipe.execute()

    def track_artists(self, track_ids: list[str]) -> dict[str, str]:
        """Artist of each listed track that the catalogue copy in Redis names (one MGET)."""
        found: dict[str, str] = {}
        if not track_ids:
            return found
        for track, raw in zip(track_ids, self._mget([self.keys.catalogue(t) for t in track_ids]), strict=True):
            if raw is None:
                continue
            try:
                artist = orjson.loads(raw).get("artist_id")
            except (orjson.JSONDecodeError, AttributeError):
                continue  # written by the catalogue sync, which checks the schema; skip if not
            if artist:
                found[track] = str(artist)
        return found

    def meta(self, version: str) -> dict[bytes, bytes]:
        return self.r.hgetall(self.keys.meta(version))  # type: ignore[no-any-return]

    def text_meta(self, version: str) -> dict[str, str]:
        """The meta fields that are text (the arrays in BINARY_META left out), decoded."""
        return {k.decode(): v.decode() for k, v in self.meta(version).items() if k not in BINARY_META}

    def set_meta(self, version: str, field_: str, value: str) -> None:
        self.r.hset(self.keys.meta(version), field_, value)

    def publish(
        self,
        version: str,
        model: ImplicitALS,
        user_ids: list[str],
        track_ids: list[str],
        meta: dict[str, object],
        candidate: bool = False,
    ) -> None:
        """Write every vector of `version` in chunks (one MSET each, the next chunk built while one is
        written), then flip model:current in one step; a `candidate` is listed and named in
        model:candidate instead (experiments serve it; `encore model promote` makes it current)."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="encore-publish") as writer:
            sent: Future[None] | None = None  # one chunk in flight while the next is built
            full_meta: dict[str, str | bytes] | None = None
            for ids, F, entity in ((user_ids, model.user_factors_, "user"), (track_ids, model.item_factors_, "track")):
                keys = self.keys.vector_keys(version, entity, ids)
                for s in range(0, len(ids), CHUNK):
                    hi = min(s + CHUNK, len(ids))
                    chunk = dict(zip(keys[s:hi], encode_vectors(F[s:hi]), strict=True))  # per chunk: no copy of all
                    if full_meta is None:  # the meta's arrays are computed while the first chunk is written
                        full_meta = version_meta(model, len(user_ids), len(track_ids), meta)
                    if sent is not None:
                        sent.result()
                    sent = writer.submit(self._mset, chunk)
            if sent is not None:
                sent.result()
        if full_meta is None:
            full_meta = version_meta(model, len(user_ids), len(track_ids), meta)
        pipe = self.r.pipeline(transaction=False)  # nothing reads them before the flip
        pipe.hset(self.keys.meta(version), mapping=full_meta)  # type: ignore[arg-type]
        pipe.set(self.keys.track_ids(version), "\n".join(track_ids))
        pipe.execute()
        if candidate:
            self.r.zadd(self.keys.versions, {version: time.time()})
            self.r.set(self.keys.candidate, version)
            log.info("model version %s is the candidate", version)
        else:
            self.flip(version)

    def candidate_version(self) -> str | None:
        v = self.r.get(self.keys.candidate)
        return v.decode() if v else None

    def promote(self, version: str) -> None:
        """Make `version` current; it stops being the candidate."""
        self.flip(version)
        if self.candidate_version() == version:
            self.r.delete(self.keys.candidate)

    def resolve(self, arm: str) -> str | None:
        """The version an experiment arm names now: `current`, `candidate` or a version."""
        if arm == "current":
            return self.current_version()
        if arm == "candidate":
            return self.candidate_version()
        return arm if self.r.exists(self.keys.meta(arm)) else None

    def flip(self, version: str) -> None:
        """Make `version` current. The flip is the one write of `model:current`: a reader
        reads it once per request and then only keys of that version, which stay readable for
        the grace period, so no reader mixes two versions (on a cluster too: no transaction
        spans slots, and none is needed). The version is listed before it becomes current."""
        if not self.r.exists(self.keys.meta(version)):
            raise UnknownVersionError(f"version {version} is not in Redis (expired?); see `encore model list`")
        self.r.zadd(self.keys.versions, {version: time.time()})
        self.r.set(self.keys.current, version)
        log.info("model version %s is current", version)

    def load(self, version: str) -> LoadedModel:
        """Track factors, ids and the user Gram matrix of `version` (artifact file if readable)."""
        meta_raw = self.r.hgetall(self.keys.meta(version))
        if not meta_raw:
            raise UnknownVersionError(f"model version {version} has no meta in Redis")
        gram_bytes = meta_raw.pop(b"user_gram")
        sample_bytes = meta_raw.pop(b"query_sample", b"")
        popularity = np.frombuffer(meta_raw.pop(b"popularity", b""), dtype="<f4").astype(np.float32)
        meta = {k.decode(): v.decode() for k, v in meta_raw.items()}
        model = ImplicitALS(**json.loads(meta["params"]))
        ids_raw = self.r.get(self.keys.track_ids(version)) or b""
        track_ids = ids_raw.decode().split("\n") if ids_raw else []
        artifact = meta.get("artifact", "")
        items = self._artifact_items(artifact) if artifact and os.path.exists(artifact) else None
        if items is None:
            items = np.zeros((len(track_ids), model.factors), dtype=np.float32)
            for s in range(0, len(track_ids), CHUNK):
                raw = self._mget([self.keys.track(version, t) for t in track_ids[s : s + CHUNK]])
                for j, b in enumerate(raw):
                    if b is not None:
                        items[s + j] = decode_vector(b)
        if not np.all(np.isfinite(items)):
            raise ValueError(f"model version {version} has non-finite track factors")
        model.item_factors_ = items
        model.user_factors_ = np.zeros((0, model.factors), dtype=np.float32)
        gram = np.frombuffer(gram_bytes, dtype="<f8").reshape(model.factors, model.factors).copy()
        sample = np.frombuffer(sample_bytes, dtype="<f4").reshape(-1, model.factors).astype(np.float32)
        return LoadedModel(version, model, track_ids, gram, meta, query_sample=sample, popularity=popularity)

    @staticmethod
    def _artifact_items(path: str) -> np.ndarray | None:
        """Track factors from the artifact, or None (read from Redis) when it fails its checksum."""
        try:
            return read_npz(Path(path), "model artifact", "reading the track vectors from Redis instead")[
                "item_factors"
            ].astype(np.float32)
        except CorruptFileError as exc:
            log.error("%s", exc)
            return None

    def load_current(self) -> LoadedModel | None:
        v = self.current_version()
        return self.load(v) if v else None

    def delete_version(self, version: str) -> int:
        """Remove every key of `version` (never the current one); returns how many."""
        if self.current_version() == version:
            raise ValueError(f"refusing to delete the current version {version}")
        n = 0
        batch: list[bytes] = []
        for k in self.r.scan_iter(match=self.keys.version_pattern(version), count=5000):
            batch.append(k)
            if len(batch) >= 5000:
                n += int(self.r.unlink(*batch))
                batch = []
        if batch:
            n += int(self.r.unlink(*batch))
        self.r.zrem(self.keys.versions, version)
        return n

    # ---- vectors -------------------------------------------------------------------
    def user_vectors(self, version: str, users: list[str]) -> list[bytes | None]:
        """Stored vectors of `users` in `version` (None where missing), one MGET."""
        return self._mget([self.keys.user(version, u) for u in users]) if users else []

    def track_vector(self, version: str, track: str) -> bytes | None:
        return self.r.get(self.keys.track(version, track))  # type: ignore[no-any-return]

    def put_track_vector(self, version: str, track: str, vector: np.ndarray) -> None:
        self.r.set(self.keys.track(version, track), encode_vector(vector))
