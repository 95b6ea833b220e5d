"""Re-solving against the frozen factors of the current model: users from their histories,
new tracks from their listeners (cold start). Works over the speed layer's ports only."""

from __future__ import annotations

import logging
from itertools import chain, repeat

import numpy as np
import scipy.sparse as sp

from core.messages import VECTOR_DTYPE, FactorUpdate, decode_vector
from services.infra.model_store import LoadedModel
from services.infra.stage_timer import stage
from services.speed.ports import HistoryStore, ModelStore, UpdateSink

log = logging.getLogger(__name__)


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


def resolve_users(
    histories: HistoryStore, models: ModelStore, model: LoadedModel, users: list[str], sink: UpdateSink
) -> np.ndarray:
    """Solve `users` against the frozen track factors, store the vectors, announce them.

    A user who already has a vector in this version is warm-started from it (a few CG steps:
    one new play moves the solution a little); a user without one is solved exactly.
    """
    k = model.model.factors
    if not users:
        return np.zeros((0, k), dtype=np.float32)
    start = np.zeros((len(users), k), dtype=np.float32)
    with stage("vectors_read"):
        have: list[int] = []
        blobs: list[bytes] = []
        for i, raw in enumerate(models.user_vectors(model.version, users)):
            if raw is not None and len(raw) == 4 * k:
                have.append(i)
                blobs.append(raw)
        if have:  # one copy of every stored vector, not one array per user
            start[have] = np.frombuffer(b"".join(blobs), dtype=VECTOR_DTYPE).reshape(len(have), k)
    with stage("histories_read"):
        raw_histories = histories.raw_histories(users)
    with stage("solve"):
        rows = history_rows(raw_histories, model)
        vectors = model.model.fold_in(rows, model.model.item_factors_, gram=model.item_gram, start=start)
    with stage("vectors_write"):
        left_out = histories.put_vectors(model.version, users, vectors)
    if left_out:  # erased (or re-solved by another worker) meanwhile: neither stored nor announced
        log.debug("%d re-solved users left the queue meanwhile: their vectors are dropped", len(left_out))
        keep = [i for i, u in enumerate(users) if u not in left_out]
        users, vectors = [users[i] for i in keep], vectors[keep]
    with stage("produce"):
        sink.updates("user", model.version, users, vectors)
    return vectors


def resolve_new_tracks(
    histories: HistoryStore,
    models: ModelStore,
    model: LoadedModel,
    tracks: list[str],
    min_listeners: int,
    sink: UpdateSink,
) -> list[str]:
    """Cold start: a track unknown to the model gets a vector solved against its listeners'
    vectors and the full user Gram matrix, once `min_listeners` of them have a vector."""
    folded: list[str] = []
    for track in tracks:
        if track in model.track_index:
            continue
        listeners, weights = histories.listener_weights(track)
        if len(listeners) < min_listeners:
            continue
        vecs, ws = [], []
        for raw, w in zip(models.user_vectors(model.version, listeners), weights, strict=True):
            if raw is not None and w > 0:
                vecs.append(decode_vector(raw))
                ws.append(w)
        if len(vecs) < min_listeners:
            continue
        col = sp.csr_matrix(np.array([ws], dtype=np.float32))
        v = model.model.fold_in(col, np.stack(vecs), gram=model.user_gram)[0]
        models.put_track_vector(model.version, track, v)
        sink.update(FactorUpdate("track", track, model.version, v))
        folded.append(track)
    return folded
