"""Fold-in against the current model: users from their histories, new tracks from listeners."""

from __future__ import annotations

import base64
import json
import logging
from itertools import chain, repeat
from typing import Any, Protocol

import numpy as np
import redis
import scipy.sparse as sp

from services.history_store import HistoryStore
from services.keys import Keys, decode_vector, encode_vector
from services.model_store import LoadedModel

log = logging.getLogger(__name__)


class Sender(Protocol):
    """What fold-in needs of a producer: kafka-python's KafkaProducer and UpdatePublisher fit."""

    def send(self, topic: str, value: bytes | None = None, key: bytes | None = None) -> Any: ...


def update_message(version: str, vector: np.ndarray | None) -> bytes | None:
    """Value of a `factor-updates` record; None (a tombstone) removes the entity.

    `vector` is base64 of the float32 little-endian bytes (the Redis encoding): a JSON list of
    64 floats costs several times more to build and parse on the hot path. Versions are
    generated `[0-9A-Za-z-]` strings, so the JSON is formatted directly.
    """
    if vector is None:
        return None
    b64 = base64.b64encode(encode_vector(vector))
    return b'{"model_version": "%s", "dtype": "float32le", "vector": "%s"}' % (version.encode(), b64)


def parse_update(value: bytes) -> tuple[str, np.ndarray]:
    """(model version, vector) of a `factor-updates` value; accepts a base64 or a list vector."""
    d = json.loads(value)
    v = d["vector"]
    vec = decode_vector(base64.b64decode(v)) if isinstance(v, str) else np.asarray(v, dtype=np.float32)
    return str(d["model_version"]), vec


def history_rows(histories: list[list[bytes]], model: LoadedModel) -> sp.csr_matrix:
    """Flat [track, weight, ...] histories as a users × model-tracks matrix; unknown tracks left out."""
    lens = np.fromiter((len(h) // 2 for h in histories), dtype=np.int64, count=len(histories))
    n = int(lens.sum())
    tracks = chain.from_iterable(h[0::2] for h in histories)
    cols = np.fromiter(map(model.track_index_b.get, tracks, repeat(-1)), dtype=np.int64, count=n)
    vals = np.fromiter(map(float, chain.from_iterable(h[1::2] for h in histories)), dtype=np.float32, count=n)
    rows = np.repeat(np.arange(len(histories)), lens)
    keep = (cols >= 0) & (vals > 0)
    return sp.csr_matrix((vals[keep], (rows[keep], cols[keep])), shape=(len(histories), len(model.track_ids)))


def refold_users(
    r: redis.Redis,
    keys: Keys,
    store: HistoryStore,
    model: LoadedModel,
    users: list[str],
    producer: Sender | None,
    updates_topic: str,
) -> np.ndarray:
    """Solve `users` against the frozen track factors, write vectors, announce them.

    A user who already has a vector in this version is warm-started from it (a few CG steps);
    a user without one is solved exactly.
    """
    k = model.model.factors
    if not users:
        return np.zeros((0, k), dtype=np.float32)
    user_keys = [keys.user(model.version, u) for u in users]
    start = np.zeros((len(users), k), dtype=np.float32)
    for i, raw in enumerate(r.mget(user_keys)):
        if raw is not None and len(raw) == 4 * k:
            start[i] = decode_vector(raw)
    rows = history_rows(store.raw_histories(users), model)
    vectors = model.model.fold_in(rows, model.model.item_factors_, gram=model.item_gram, start=start)
    r.mset({key: encode_vector(v) for key, v in zip(user_keys, vectors, strict=True)})
    if producer is not None:
        for u, v in zip(users, vectors, strict=True):
            producer.send(updates_topic, key=f"user:{u}".encode(), value=update_message(model.version, v))
    return vectors


def fold_new_tracks(
    r: redis.Redis,
    keys: Keys,
    model: LoadedModel,
    tracks: list[str],
    min_listeners: int,
    producer: Sender | None,
    updates_topic: str,
) -> list[str]:
    """Cold start: tracks unknown to the model get a vector from their listeners' vectors."""
    folded: list[str] = []
    for track in tracks:
        if track in model.track_index:
            continue
        listeners = [u.decode() for u in r.zrange(keys.listeners(track), 0, -1)]
        if len(listeners) < min_listeners:
            continue
        pipe = r.pipeline(transaction=False)
        for u in listeners:
            pipe.get(keys.user(model.version, u))
            pipe.hget(keys.history(u), track)
        got = pipe.execute()
        vecs, weights = [], []
        for j in range(len(listeners)):
            vec, w = got[2 * j], got[2 * j + 1]
            if vec is not None and w is not None and float(w) > 0:
                vecs.append(decode_vector(vec))
                weights.append(float(w))
        if len(vecs) < min_listeners:
            continue
        col = sp.csr_matrix(np.array([weights], dtype=np.float32))
        v = model.model.fold_in(col, np.stack(vecs), gram=model.user_gram)[0]
        r.set(keys.track(model.version, track), encode_vector(v))
        if producer is not None:
            producer.send(updates_topic, key=f"track:{track}".encode(), value=update_message(model.version, v))
        folded.append(track)
    return folded
