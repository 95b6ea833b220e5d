"""Serving state of one replica: current model, HNSW indexes, kept fresh from factor-updates."""

from __future__ import annotations

import fcntl
import gc
import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis
import scipy.sparse as sp

from core.index import HNSWIndex, Space
from core.index_tuning import EfChoice, tune_ef
from services import confluent_io, kafka_io, model_store
from services.config import Settings
from services.folding import parse_update
from services.keys import Keys, decode_vector
from services.model_store import LoadedModel
from services.rwlock import ReadWriteLock

log = logging.getLogger(__name__)
REBUILD_DELETED_SHARE = 0.2


@dataclass
class Snapshot:
    """One model version with its two indexes; replaced as a whole, never mutated half-way."""

    loaded: LoadedModel
    ip: HNSWIndex
    cosine: HNSWIndex
    popular: list[str]
    ef: dict[str, EfChoice] | None = None  # per space, when ef was chosen by measured recall


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[bool]:
    """Hold an exclusive file lock for the block; yields False (no lock, no snapshots) when the
    snapshot directory cannot be written."""
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock_path, "w")  # noqa: SIM115 - closed below, which releases the lock
    except OSError as exc:
        log.warning("index snapshots off (%s): building in memory", exc)
        yield False
        return
    try:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield True
    finally:
        f.close()


class ServingState:
    """Holds the current Snapshot; a background thread follows versions and updates."""

    def __init__(self, settings: Settings, r: redis.Redis) -> None:
        self.s, self.r = settings, r
        self.keys = Keys(settings.key_prefix)
        self.snapshot: Snapshot | None = None
        self.stop_event = threading.Event()
        self.lock = ReadWriteLock()  # queries read; updates, rebuild copies and swaps write
        self.updates_applied = 0
        self._rebuilding = False
        self._replay: list[tuple[bytes, bytes | None]] = []

    # ---- building --------------------------------------------------------------------
    def _snapshot_dir(self) -> Path:
        return Path(self.s.data_dir) / "index"

    def _index(self, version: str, space: Space, F: np.ndarray, ids: list[str], ef: int | None) -> HNSWIndex:
        """The version's graph for `space`: loaded from its snapshot, else built and saved.

        A file lock makes the workers of one `encore serve` (and replicas sharing a data dir)
        build each graph once: the others wait, then load the saved snapshot.
        """
        path = self._snapshot_dir() / f"{version}-{space}.bin"
        with _exclusive(Path(f"{path}.lock")) as saving:
            if path.exists():
                log.info("index %s/%s: loaded from snapshot %s", version, space, path)
                return HNSWIndex.load(path, ef=ef)
            t0 = time.perf_counter()
            idx = HNSWIndex(F.shape[1], space, capacity=max(len(ids), 1024), ef=ef)
            idx.upsert(ids, F)
            log.info("index %s/%s: built %d tracks in %.1fs", version, space, len(ids), time.perf_counter() - t0)
            if saving:
                try:
                    idx.save(path)
                except OSError as exc:
                    log.warning("could not save index snapshot %s: %s", path, exc)
            return idx

    def build(self, version: str) -> Snapshot:
        loaded = model_store.load(self.r, self.keys, version)
        F = loaded.model.item_factors_
        ids = loaded.track_ids
        indexes, chosen = [], {}
        fixed_ef = self.s.index_ef or None
        for space in ("ip", "cosine"):
            idx = self._index(version, space, F, ids, fixed_ef)
            if fixed_ef is None:
                # Personal queries are user vectors (the trainer ships a sample); similar-track
                # queries are the indexed tracks themselves.
                users = loaded.query_sample if space == "ip" else None
                chosen[space] = tune_ef(idx, ids, F, queries=users, target=self.s.index_recall)
                log.info(
                    "index %s/%s: ef=%d (recall@10 %.3f on %d sampled queries)",
                    version,
                    space,
                    chosen[space].ef,
                    chosen[space].recall,
                    chosen[space].queries,
                )
            indexes.append(idx)
        popular = json.loads(loaded.meta.get("popular", "[]")) or ids[:1000]
        snap = Snapshot(loaded, indexes[0], indexes[1], popular, chosen or None)
        if ids:  # load the compiled fold-in kernels now: the first call takes ~0.3 s and would stall requests
            self.fold_in_plays(snap, {ids[0]: 1.0})
        return snap

    def refresh(self) -> None:
        """Swap in the current version once its indexes are built (the old one answers meanwhile)."""
        version = model_store.current_version(self.r, self.keys)
        if version is None or (self.snapshot and self.snapshot.loaded.version == version):
            return
        t0 = time.perf_counter()
        snap = self.build(version)
        with self.lock.write():
            self.snapshot = snap
        # The model's id lists and maps are long-lived: freeze them out of the collector's sight,
        # or every full collection walks them while all request threads wait. Unfreezing first
        # lets the collection free the replaced snapshot, cycles included.
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        log.info(
            "serving model %s (%d tracks, index ready in %.1fs)",
            version,
            len(snap.ip),
            time.perf_counter() - t0,
        )

    # ---- updates -----------------------------------------------------------------------
    def apply_update(self, key: bytes, value: bytes | None) -> None:
        snap = self.snapshot
        if snap is None or not key.startswith(b"track:"):
            return
        track = key[6:].decode()
        if self._rebuilding:
            self._replay.append((key, value))  # re-applied to the rebuilt indexes
        if value is None:
            with self.lock.write():
                snap.ip.remove([track])
                snap.cosine.remove([track])
        else:
            version, vec = parse_update(value)
            if version != snap.loaded.version:
                return
            with self.lock.write():
                snap.ip.upsert([track], vec[None])
                snap.cosine.upsert([track], vec[None])
        self.updates_applied += 1
        if not self._rebuilding and snap.ip.deleted > REBUILD_DELETED_SHARE * max(len(snap.ip), 1):
            self._rebuilding = True
            threading.Thread(target=self._rebuild, args=(snap,), daemon=True).start()

    def _rebuild(self, snap: Snapshot) -> None:
        """Rebuild both indexes without the deleted nodes, then swap them in."""
        # Copy on the read side: queries go on (they run on the event loop), updates wait; an
        # update that landed since `_rebuilding` was set is replayed after the swap (idempotent).
        with self.lock.read():
            ids = list(snap.ip.slots.label)
            vecs = snap.ip.index.get_items([snap.ip.slots.label[t] for t in ids]) if ids else []
            vecs = np.asarray(vecs, dtype=np.float32).reshape(len(ids), snap.ip.dim)
        fresh = [  # same search breadth as the indexes they replace
            HNSWIndex(vecs.shape[1], old.space, capacity=len(ids) + 1024, ef=old.ef) for old in (snap.ip, snap.cosine)
        ]
        for idx in fresh:
            idx.upsert(ids, vecs)
        with self.lock.write():
            if self.snapshot is snap:
                self.snapshot = Snapshot(snap.loaded, fresh[0], fresh[1], snap.popular, snap.ef)
            replay, self._replay, self._rebuilding = self._replay, [], False
        for key, value in replay:
            self.apply_update(key, value)

    def follow(self) -> None:
        """Background loop: model versions from Redis, track changes from factor-updates.

        The topic also carries every user update (tens of thousands a second at full speed);
        librdkafka decodes them off the GIL and only `track:` keys reach Python code.
        """
        consumer = None
        while not self.stop_event.is_set():
            try:
                self.refresh()
                if consumer is None:
                    kafka_io.ensure_topics(self.s)
                    consumer = confluent_io.reader(self.s.kafka_bootstrap, self.s.updates_topic)
                for m in confluent_io.data_messages(consumer.consume(num_messages=5000, timeout=0.2)):
                    key = m.key()
                    if key and key.startswith(b"track:"):
                        self.apply_update(key, m.value())
            except Exception as exc:  # keep serving the last good snapshot
                log.warning("serving follower: %s: %s; retrying", type(exc).__name__, exc)
                self.stop_event.wait(1.0)
        if consumer is not None:
            consumer.close()

    # ---- queries -----------------------------------------------------------------------
    async def user_context(self, ar: Any, version: str, user_id: str) -> tuple[np.ndarray | None, set[str]]:
        """A user's vector in `version` and the tracks they played, in one round trip (asyncio)."""
        async with ar.pipeline(transaction=False) as pipe:
            pipe.get(self.keys.user(version, user_id))
            pipe.hkeys(self.keys.history(user_id))
            raw, played = await pipe.execute()
        return (None if raw is None else decode_vector(raw)), {t.decode() for t in played}

    def search(self, index: HNSWIndex, vec: np.ndarray, n: int, exclude: Any = ()) -> list[tuple[str, float]]:
        """Top-n, run on the calling (event-loop) thread. Handing each search to a query
        thread cost more than the search: at 500 requests/s with ef 40, serve used 0.72 cores
        with two query threads and 0.50 inline (bench/serving). Parallelism comes from worker
        processes instead (ENCORE_API_WORKERS)."""
        with self.lock.read():
            return index.query(vec, n, exclude=exclude)

    def track_vector(self, snap: Snapshot, track_id: str) -> np.ndarray | None:
        with self.lock.read():
            return snap.cosine.vector(track_id)

    def fold_in_plays(self, snap: Snapshot, plays: dict[str, float]) -> np.ndarray | None:
        known = [(snap.loaded.track_index[t], c) for t, c in plays.items() if t in snap.loaded.track_index]
        if not known:
            return None
        cols, vals = zip(*known, strict=True)
        row = sp.csr_matrix(
            (np.array(vals, dtype=np.float32), ([0] * len(cols), cols)), shape=(1, len(snap.loaded.track_ids))
        )
        return snap.loaded.model.fold_in(row, snap.loaded.model.item_factors_, gram=snap.loaded.item_gram)[0]
