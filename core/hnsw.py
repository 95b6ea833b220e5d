"""HNSW track index (hnswlib), updated in place; an inner-product index is split into norm bands.

Why bands: a user's best inner products go mostly to long track vectors (on 200k ALS-like
tracks the exact top 10 sat, on average, in the top 1 % of norms), and a single inner-product
graph had to be searched ~500 wide to find them. So a large "ip" index keeps its longest
vectors (HEAD_SHARE of them at build) in a small graph of their own and the rest in a second
one; each band is searched with its own breadth and the answers are merged by score. The merge
is exact: a true top-n track that its band returns is in the merged top n, so recall is the sum
of the bands' recalls and `core.index_tuning` chooses each band's ef separately.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import hnswlib
import numpy as np

from core.exact_band import EXACT_BAND_MAX, ExactBand
from core.index import Slots, Space, prep

# Search breadth before tuning. Inner-product graphs over ALS-like vectors need a wide search:
# on 200k such tracks one graph reached recall@10 0.910 at ef=200, 0.947 at 400, 0.966 at 800.
DEFAULT_EF = 800
HEAD_SHARE = 0.02  # share of an inner-product index, longest vectors first, in the head band
SPLIT_AT = 50_000  # smaller indexes stay one graph: searching them wide is cheap


def _graph(dim: int, capacity: int, m: int, ef_construction: int, ef: int) -> hnswlib.Index:
    g = hnswlib.Index(space="ip", dim=dim)  # cosine = ip over unit vectors
    g.init_index(max_elements=max(capacity, 16), M=m, ef_construction=ef_construction, allow_replace_deleted=False)
    g.set_ef(ef)
    return g


class HNSWIndex:
    """hnswlib graphs (one per band), updated in place: upserts replace vectors, removals are
    marked deleted. `cuts` are the bands' lower norm bounds, longest band first (empty: one graph)."""

    def __init__(
        self,
        dim: int,
        space: Space = "ip",
        capacity: int = 1024,
        m: int = 16,
        ef_construction: int = 200,
        ef: int | None = None,
        threads: int = -1,
        cuts: Sequence[float] | None = None,
        head_share: float = HEAD_SHARE,
        split_at: int = SPLIT_AT,
        exact_max: int = EXACT_BAND_MAX,
    ) -> None:
        self.dim, self.space, self.threads = dim, space, threads
        self.m, self.ef_construction, self.capacity = m, ef_construction, capacity
        self.head_share, self.split_at, self.exact_max = head_share, split_at, exact_max
        self.exact: ExactBand | None = None  # the head band's exact scan (`core.exact_band`), when small
        self.cuts: list[float] | None = list(cuts) if cuts is not None else None  # None: decided at first upsert
        self.band_ef: list[int] = []
        self._ef = ef if ef is not None else DEFAULT_EF
        self.graphs: list[hnswlib.Index] = []
        self.live: list[int] = []  # live tracks per band
        self.band_of = np.zeros(0, dtype=np.int8)  # band of each label
        self.slots = Slots()
        self.deleted = 0
        self.mutations = 0  # upserts and removals so far: tells caches built on the graph they are stale

    # ---- bands -------------------------------------------------------------------------------
    def _open_bands(self, norms: np.ndarray) -> None:
        """Fix the bands at the first upsert: split by norm when large and inner-product."""
        if self.cuts is None:
            split = self.space == "ip" and 0 < self.head_share < 1 and len(norms) >= self.split_at
            self.cuts = [float(np.quantile(norms, 1 - self.head_share))] if split else []
        counts = np.bincount(self._bands_for(norms), minlength=len(self.cuts) + 1)
        spare = max(0, self.capacity - len(norms))
        for c in counts.tolist():
            cap = c + spare * c // max(len(norms), 1) + 16
            self.graphs.append(_graph(self.dim, cap, self.m, self.ef_construction, self._ef))
            self.live.append(0)
            self.band_ef.append(self._ef)
        if self.cuts and counts[0] <= self.exact_max:
            self.exact = ExactBand(self.dim, int(counts[0]) + 16)

    def _bands_for(self, norms: np.ndarray) -> np.ndarray:
        cuts = np.asarray(self.cuts or [], dtype=np.float64)
        return (norms[:, None] < cuts[None, :]).sum(axis=1).astype(np.int8)

    @property
    def ef(self) -> int:
        """The widest band's search breadth (what a filtered search over-fetches to)."""
        return max(self.band_ef) if self.band_ef else self._ef

    def set_ef(self, ef: int) -> None:
        """One search breadth for every band (hnswlib still searches at least k wide)."""
        self.set_band_ef([ef] * max(len(self.graphs), 1))

    def set_band_ef(self, efs: Sequence[int]) -> None:
        """A search breadth per band, longest band first."""
        if self.graphs and len(efs) != len(self.graphs):
            raise ValueError(f"{len(efs)} breadths for {len(self.graphs)} bands")
        self._ef = max(efs)
        self.band_ef = list(efs) if self.graphs else []
        for g, ef in zip(self.graphs, self.band_ef, strict=False):
            g.set_ef(ef)

    # ---- updates -----------------------------------------------------------------------------
    def upsert(self, ids: list[str], vectors: np.ndarray) -> None:
        if not ids:
            return
        self.mutations += 1
        v = prep(vectors, self.space)
        norms = np.linalg.norm(v, axis=1)
        if not self.graphs:
            self._open_bands(norms)
        # A changed vector goes in under a fresh label and the old node is marked deleted:
        # hnswlib's in-place update re-links poorly under inner product (recall fell to 0.93).
        self.remove([t for t in ids if t in self.slots.label])
        labels = self.slots.assign(ids)
        if int(labels.max()) >= self.band_of.size:
            grown = np.zeros(max(int(labels.max()) + 1, 2 * self.band_of.size), dtype=np.int8)
            grown[: self.band_of.size] = self.band_of
            self.band_of = grown
        bands = self._bands_for(norms)
        self.band_of[labels] = bands
        for b, g in enumerate(self.graphs):
            rows = np.flatnonzero(bands == b)
            if not rows.size:
                continue
            need = g.get_current_count() + rows.size
            if need > g.get_max_elements():
                g.resize_index(max(need, 2 * g.get_max_elements()))
            g.add_items(v[rows], labels[rows], num_threads=self.threads, replace_deleted=False)
            if b == 0 and self.exact is not None:
                self.exact.add(labels[rows], v[rows])
            self.live[b] += int(rows.size)

    def remove(self, ids: Iterable[str]) -> None:
        for t in ids:
            lab = self.slots.drop(t)
            if lab is not None:
                b = int(self.band_of[lab])
                self.graphs[b].mark_deleted(lab)
                if b == 0 and self.exact is not None:
                    self.exact.remove(lab)
                self.live[b] -= 1
                self.deleted += 1
                self.mutations += 1

    # ---- search ------------------------------------------------------------------------------
    def knn(
        self, vectors: np.ndarray, k: int, threads: int = 1, filter: Callable[[int], bool] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """hnswlib's knn_query over every band, merged: (labels, distances = 1 - score), each
        (queries, k), best first. Raises RuntimeError, as hnswlib does, when a band cannot
        return its share (deleted nodes cut it off, or `filter` passes too few)."""
        q = prep(vectors, self.space)
        parts = [self._band_search(b, q, min(k, live), threads, filter) for b, live in enumerate(self.live) if live > 0]
        if len(parts) == 1:
            return parts[0]
        if len(q) == 1:  # one query (a request): 1-D merges, a few microseconds less than 2-D ones
            labels1 = np.concatenate([p[0][0] for p in parts])
            dist1 = np.concatenate([p[1][0] for p in parts])
            top = np.argsort(dist1, kind="stable")[:k]
            return labels1[top][None], dist1[top][None]
        labels = np.concatenate([p[0] for p in parts], axis=1)
        dist = np.concatenate([p[1] for p in parts], axis=1)
        order = np.argsort(dist, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(labels, order, axis=1), np.take_along_axis(dist, order, axis=1)

    def _band_search(
        self, band: int, q: np.ndarray, k: int, threads: int, filter: Callable[[int], bool] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        if band == 0 and self.exact is not None:
            return self.exact.knn(q, k, filter)
        return self.graphs[band].knn_query(q, k=k, num_threads=threads, filter=filter)  # type: ignore[no-any-return]

    def band_knn(self, band: int, vectors: np.ndarray, k: int) -> np.ndarray:
        """Labels of one band's top k per query (approximate, or exact for the exact band), for
        tuning that band's ef: an exact band finds its whole share at any ef."""
        return self._band_search(band, prep(vectors, self.space), min(k, self.live[band]), 1, None)[0]

    def query(self, vector: np.ndarray, n: int, exclude: Iterable[str] = ()) -> list[tuple[str, float]]:
        excl = {self.slots.label[t] for t in exclude if t in self.slots.label}
        live = len(self.slots.label)
        want = min(n, live - len(excl))
        if want <= 0:
            return []
        k = min(live, n + len(excl))
        while True:
            # hnswlib searches max(ef, k) wide on its own, so queries never change shared state:
            # several threads may query at once (the GIL is released during the search).
            labels, dist = self.knn(vector, k)
            out = [
                (str(self.slots.ids[lab]), float(1.0 - d))
                for lab, d in zip(labels[0].tolist(), dist[0].tolist(), strict=True)
                if lab not in excl
            ]
            if len(out) >= want or k >= live:
                return out[:n]
            k = min(live, 2 * k)

    def ranked(self, vector: np.ndarray, k: int) -> Iterator[tuple[str, float]]:
        """The (about) k best live tracks, best first, each converted only when read: a filtered
        query asks for hundreds and usually reads a few dozen. Where the graphs cannot hand back
        k (k near the whole index), an exact scan of every live vector answers instead."""
        k = min(k, len(self.slots.label))
        if k <= 0:
            return iter(())
        try:
            labels, dist = self.knn(vector, k)
        except RuntimeError:
            return self._scan(vector)
        ids = self.slots.ids
        return ((str(ids[lab]), 1.0 - float(d)) for lab, d in zip(labels[0].tolist(), dist[0], strict=True))

    def _scan(self, vector: np.ndarray) -> Iterator[tuple[str, float]]:
        labels = np.fromiter(self.slots.label.values(), dtype=np.int64, count=len(self.slots.label))
        scores = self._items(labels) @ prep(vector, self.space)[0]
        ids = self.slots.ids
        return ((str(ids[labels[i]]), float(scores[i])) for i in np.argsort(-scores, kind="stable"))

    # ---- stored vectors ----------------------------------------------------------------------
    def _items(self, labels: np.ndarray) -> np.ndarray:
        out = np.empty((len(labels), self.dim), dtype=np.float32)
        bands = self.band_of[labels]
        for b, g in enumerate(self.graphs):
            rows = np.flatnonzero(bands == b)
            if rows.size:
                out[rows] = np.asarray(g.get_items(labels[rows].tolist()), dtype=np.float32)
        return out

    def vector(self, track_id: str) -> np.ndarray | None:
        lab = self.slots.label.get(track_id)
        return None if lab is None else self._items(np.array([lab]))[0]

    def stored(self, track_ids: list[str]) -> np.ndarray:
        """The vectors as searched (unit length in a cosine index), one row per live track id."""
        labels = np.array([self.slots.label[t] for t in track_ids], dtype=np.int64)
        return self._items(labels)

    def __len__(self) -> int:
        return len(self.slots.label)

    def __contains__(self, track_id: object) -> bool:
        return track_id in self.slots.label

    # ---- snapshots ---------------------------------------------------------------------------
    @staticmethod
    def _band_path(path: Path, band: int) -> Path:
        return path if band == 0 else Path(f"{path}.band{band}")

    def save(self, path: str | Path) -> None:
        """Snapshot: the id map, then the graphs, each written to a temporary name and renamed,
        the first band's graph (at `path`) last, so a reader that finds it finds a whole snapshot."""
        path = Path(path)
        if not self.graphs:
            self._open_bands(np.zeros(0))
        meta = {
            "ids": self.slots.ids,
            "space": self.space,
            "dim": self.dim,
            "deleted": self.deleted,
            "m": self.m,
            "ef_construction": self.ef_construction,
            "cuts": self.cuts or [],
            "band_of": self.band_of[: len(self.slots.ids)].tolist(),
        }
        ids_tmp = Path(f"{path}.ids.json.tmp")
        ids_tmp.write_text(json.dumps(meta))
        ids_tmp.replace(f"{path}.ids.json")
        for b in reversed(range(len(self.graphs))):
            final = self._band_path(path, b)
            self.graphs[b].save_index(f"{final}.tmp")
            Path(f"{final}.tmp").replace(final)

    @classmethod
    def load(cls, path: str | Path, ef: int | None = None) -> HNSWIndex:
        """A saved snapshot; one written before bands existed loads as one band."""
        path = Path(path)
        meta = json.loads(Path(f"{path}.ids.json").read_text())
        obj = cls(meta["dim"], meta["space"], m=meta.get("m", 16), ef_construction=meta.get("ef_construction", 200))
        obj.cuts = list(meta.get("cuts", []))
        obj._ef = DEFAULT_EF if ef is None else ef
        obj.slots.ids = meta["ids"]
        obj.slots.label = {t: i for i, t in enumerate(meta["ids"]) if t is not None}
        obj.band_of = np.asarray(meta.get("band_of") or [0] * len(meta["ids"]), dtype=np.int8)
        obj.deleted = meta["deleted"]
        alive = np.fromiter(obj.slots.label.values(), dtype=np.int64, count=len(obj.slots.label))
        obj.live = np.bincount(obj.band_of[alive], minlength=len(obj.cuts) + 1).tolist()
        for b in range(len(obj.cuts) + 1):
            g = hnswlib.Index(space="ip", dim=obj.dim)
            g.load_index(str(cls._band_path(path, b)), max_elements=0)
            obj.graphs.append(g)
        obj.set_ef(obj._ef)
        if obj.cuts and obj.live[0] <= obj.exact_max:  # the exact scan's rows, from the head's graph
            head = alive[obj.band_of[alive] == 0]
            obj.exact = ExactBand(obj.dim, len(head) + 16)
            if len(head):
                obj.exact.add(head, np.asarray(obj.graphs[0].get_items(head.tolist()), dtype=np.float32))
        return obj
