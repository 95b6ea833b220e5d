"""Model versions in Redis: publish (write all vectors, then flip) and load the current one."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import redis

from core.als import ImplicitALS
from services.keys import Keys, decode_vector

log = logging.getLogger(__name__)
CHUNK = 5000
QUERY_SAMPLE = 1024  # user vectors shipped for ef tuning: more queries, a tighter recall bound, a narrower ef


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


def publish(
    r: redis.Redis,
    keys: Keys,
    version: str,
    model: ImplicitALS,
    user_ids: list[str],
    track_ids: list[str],
    meta: dict[str, object],
) -> None:
    """Write every vector of `version` in chunks (one MSET each), then flip model:current in one step."""
    for ids, F, key in (
        (user_ids, model.user_factors_, keys.user),
        (track_ids, model.item_factors_, keys.track),
    ):
        raw = np.ascontiguousarray(F, dtype="<f4").tobytes()
        width = 4 * F.shape[1]
        for s in range(0, len(ids), CHUNK):
            hi = min(s + CHUNK, len(ids))
            r.mset({key(version, ids[j]): raw[j * width : (j + 1) * width] for j in range(s, hi)})
    U = model.user_factors_.astype(np.float64)
    full_meta = {k: (v if isinstance(v, str | bytes) else json.dumps(v)) for k, v in meta.items()}
    full_meta.update(
        {
            "factors": str(model.factors),
            "params": json.dumps(model.get_params()),
            "n_users": str(len(user_ids)),
            "n_tracks": str(len(track_ids)),
            "user_gram": (U.T @ U).astype("<f8").tobytes(),
            "query_sample": _query_sample(model.user_factors_).tobytes(),
        }
    )
    full_meta.setdefault("trained_at", str(time.time()))
    pipe = r.pipeline(transaction=True)
    pipe.hset(keys.meta(version), mapping=full_meta)  # type: ignore[arg-type]
    pipe.set(keys.track_ids(version), "\n".join(track_ids))
    pipe.execute()
    flip(r, keys, version)


def _query_sample(users: np.ndarray, size: int = QUERY_SAMPLE, seed: int = 0) -> np.ndarray:
    """Up to `size` random non-zero user vectors: what serving tunes its search breadth on."""
    live = np.flatnonzero(np.any(users != 0, axis=1))
    pick = np.sort(np.random.default_rng(seed).choice(live, size=min(size, live.size), replace=False))
    return np.ascontiguousarray(users[pick], dtype="<f4")


def flip(r: redis.Redis, keys: Keys, version: str) -> None:
    """Make `version` current atomically (readers see the old or the new, never a mix)."""
    pipe = r.pipeline(transaction=True)
    pipe.set(keys.current, version)
    pipe.zadd(keys.versions, {version: time.time()})
    pipe.execute()
    log.info("model version %s is current", version)


def current_version(r: redis.Redis, keys: Keys) -> str | None:
    v = r.get(keys.current)
    return v.decode() if v else None


def load(r: redis.Redis, keys: Keys, version: str) -> LoadedModel:
    """Load track factors, ids and the user Gram matrix of `version` (artifact file if readable)."""
    meta_raw = r.hgetall(keys.meta(version))
    if not meta_raw:
        raise LookupError(f"model version {version} has no meta in Redis")
    gram_bytes = meta_raw.pop(b"user_gram")
    sample_bytes = meta_raw.pop(b"query_sample", b"")
    meta = {k.decode(): v.decode() for k, v in meta_raw.items()}
    model = ImplicitALS(**json.loads(meta["params"]))
    ids_raw = r.get(keys.track_ids(version)) or b""
    track_ids = ids_raw.decode().split("\n") if ids_raw else []
    artifact = meta.get("artifact", "")
    if artifact and os.path.exists(artifact):
        with np.load(artifact, allow_pickle=False) as z:
            items = z["item_factors"].astype(np.float32)
    else:
        items = np.zeros((len(track_ids), model.factors), dtype=np.float32)
        for s in range(0, len(track_ids), CHUNK):
            raw = r.mget([keys.track(version, t) for t in track_ids[s : s + CHUNK]])
            for j, b in enumerate(raw):
                if b is not None:
                    items[s + j] = decode_vector(b)
    if not np.all(np.isfinite(items)):
        raise ValueError(f"model version {version} has non-finite track factors")
    model.item_factors_ = items
    model.user_factors_ = np.zeros((0, model.factors), dtype=np.float32)
    gram = np.frombuffer(gram_bytes, dtype="<f8").reshape(model.factors, model.factors).copy()
    sample = np.frombuffer(sample_bytes, dtype="<f4").reshape(-1, model.factors).astype(np.float32)
    return LoadedModel(version, model, track_ids, gram, meta, query_sample=sample)


def load_current(r: redis.Redis, keys: Keys) -> LoadedModel | None:
    v = current_version(r, keys)
    return load(r, keys, v) if v else None


def delete_version(r: redis.Redis, keys: Keys, version: str) -> int:
    """Remove every key of `version` (never the current one)."""
    if current_version(r, keys) == version:
        raise ValueError(f"refusing to delete the current version {version}")
    n = 0
    batch: list[bytes] = []
    for k in r.scan_iter(match=keys.version_pattern(version), count=5000):
        batch.append(k)
        if len(batch) >= 5000:
            n += int(r.unlink(*batch))
            batch = []
    if batch:
        n += int(r.unlink(*batch))
    r.zrem(keys.versions, version)
    return n
