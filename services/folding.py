"""Fold-in against the current model: users from their histories, new tracks from listeners."""

from __future__ import annotations

import base64
import json
import logging

import numpy as np
import redis
import scipy.sparse as sp
from kafka import KafkaProducer

from services.history_store import HistoryStore
from services.keys import Keys, decode_vector, encode_vector
from services.model_store import LoadedModel

log = logging.getLogger(__name__)


def update_message(version: str, vector: np.ndarray | None) -> bytes | None:
    """Value of a `factor-updates` record; None (a tombstone) removes the entity.

    `vector` is base64 of the float32 little-endian bytes (the Redis encoding): a JSON list of
    64 floats costs several times more to build and parse on the hot path.
    """
    if vector is None:
        return None
    b64 = base64.b64encode(encode_vector(vector)).decode()
    return json.dumps({"model_version": version, "dtype": "float32le", "vector": b64}).encode()


def parse_update(value: bytes) -> tuple[str, np.ndarray]:
    """(model version, vector) of a `factor-updates` value; accepts a base64 or a list vector."""
    d = json.loads(value)
    v = d["vector"]
    vec = decode_vector(base64.b64decode(v)) if isinstance(v, str) else np.asarray(v, dtype=np.float32)
    return str(d["model_version"]), vec


def history_rows(histories: list[dict[str, float]], model: LoadedModel) -> sp.csr_matrix:
    """Histories as a users × model-tracks matrix; tracks unknown to the model are left out."""
    rows, cols, vals = [], [], []
    for i, h in enumerate(histories):
        for track, w in h.items():
            j = model.track_index.get(track)
            if j is not None and w > 0:
                rows.append(i)
                cols.append(j)
                vals.append(w)
    return sp.csr_matrix((np.array(vals, dtype=np.float32), (rows, cols)), shape=(len(histories), len(model.track_ids)))


def refold_users(
    r: redis.Redis,
    keys: Keys,
    store: HistoryStore,
    model: LoadedModel,
    users: list[str],
    producer: KafkaProducer | None,
    updates_topic: str,
) -> np.ndarray:
    """Solve `users` against the frozen track factors, write vectors, announce them."""
    if not users:
        return np.zeros((0, model.model.factors), dtype=np.float32)
    vectors = model.model.fold_in(history_rows(store.histories(users), model), model.model.item_factors_)
    pipe = r.pipeline(transaction=False)
    for u, v in zip(users, vectors, strict=True):
        pipe.set(keys.user(model.version, u), encode_vector(v))
    pipe.execute()
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
    producer: KafkaProducer | None,
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
