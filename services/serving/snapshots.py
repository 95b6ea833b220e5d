"""Serving snapshots: one model version with its two HNSW graphs, built once per data folder.

A file lock makes the workers of one `encore serve` (and replicas sharing a data folder) build
each graph once: the others wait, then load the saved snapshot.
"""

from __future__ import annotations

import fcntl
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.hnsw import HNSWIndex
from core.index import Space
from core.index_tuning import EfChoice, tune_ef
from services.infra.data_dir import DataDir
from services.infra.model_store import LoadedModel, RedisModelStore
from services.infra.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Snapshot:
    """One model version with its two indexes; replaced as a whole, never mutated half-way."""

    loaded: LoadedModel
    ip: HNSWIndex
    cosine: HNSWIndex
    popular: list[tuple[str, float]]  # (track, share of users who played it), most listened first
    ef: dict[str, EfChoice] | None = None  # per space, when ef was chosen by measured recall

    @property
    def version(self) -> str:
        return self.loaded.version

    def warm(self) -> None:
        """Load the compiled fold-in kernels now: the first call takes ~0.3 s and would stall requests."""
        if self.loaded.track_ids:
            self.fold_in_plays({self.loaded.track_ids[0]: 1.0})

    def fold_in_plays(self, plays: dict[str, float]) -> np.ndarray | None:
        """An anonymous listener's vector from raw plays (None when no track is known)."""
        idx = self.loaded.track_index
        known = [(idx[t], c) for t, c in plays.items() if t in idx]
        if not known:
            return None
        rows, counts = zip(*known, strict=True)
        model = self.loaded.model
        return model.fold_in_one(np.array(rows), np.array(counts), model.item_factors_, self.loaded.item_gram)


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


class SnapshotBuilder:
    """Loads a version and builds (or loads) its graphs, choosing ef by measured recall."""

    def __init__(self, settings: Settings, models: RedisModelStore) -> None:
        self.s, self.models = settings, models
        self.data = DataDir.of(settings.data_dir)

    def _index(self, version: str, space: Space, F: np.ndarray, ids: list[str], ef: int | None) -> HNSWIndex:
        """The version's graph for `space`: loaded from its snapshot, else built and saved."""
        path = self.data.index_snapshot(version, space)
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

    def build(self, version: str, warm: bool = True) -> Snapshot:
        """`warm=False` leaves the fold-in kernels cold (a parent about to fork: see `prefork`)."""
        loaded = self.models.load(version)
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
                    "index %s/%s: ef=%s per band (recall@10 %.3f on %d sampled queries)",
                    version,
                    space,
                    "/".join(map(str, chosen[space].bands)),
                    chosen[space].recall,
                    chosen[space].queries,
                )
            indexes.append(idx)
        snap = Snapshot(loaded, indexes[0], indexes[1], popular_of(loaded.meta, ids, loaded.popularity), chosen or None)
        if warm:
            snap.warm()
        return snap

    def prune(self, keep: set[str]) -> None:
        """Delete snapshot files of versions not in `keep` (a replica with its own data folder
        has no janitor beside it)."""
        for version in self.data.snapshot_versions() - keep:
            for path in self.data.index_files(version):
                try:
                    path.unlink(missing_ok=True)
                except OSError as exc:
                    log.warning("could not remove old index snapshot %s: %s", path, exc)


def popular_of(meta: dict[str, str], ids: list[str], shares: np.ndarray | None = None) -> list[tuple[str, float]]:
    """The popular fallback of a version: every track, most listened first, with the share of
    the model's users who played it (so a filtered fallback still fills n). A version published
    before every share was recorded gives its top list, with rank scores in (0, 1] if older still."""
    if shares is not None and len(shares) == len(ids) and len(ids):
        order = np.argsort(-shares, kind="stable")
        return [(ids[i], float(shares[i])) for i in order.tolist()]
    tracks = json.loads(meta.get("popular", "[]")) or ids[:1000]
    scores = json.loads(meta.get("popular_scores", "[]"))
    if len(scores) != len(tracks):
        scores = [(len(tracks) - i) / len(tracks) for i in range(len(tracks))]
    return list(zip(tracks, map(float, scores), strict=True))


def rebuilt(snap: Snapshot, ids: list[str], vecs: np.ndarray) -> Snapshot:
    """The same version re-indexed from `vecs` without deleted nodes, same search breadth."""
    fresh = [
        HNSWIndex(vecs.shape[1], old.space, capacity=len(ids) + 1024, ef=old.ef, cuts=old.cuts)
        for old in (snap.ip, snap.cosine)
    ]
    for idx, old in zip(fresh, (snap.ip, snap.cosine), strict=True):
        idx.upsert(ids, vecs)
        if len(idx.band_ef) == len(old.band_ef):
            idx.set_band_ef(old.band_ef)
    return Snapshot(snap.loaded, fresh[0], fresh[1], snap.popular, snap.ef)
