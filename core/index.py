"""Track indexes behind one interface: exact (numpy, the reference, here) and HNSW (hnswlib,
`core.hnsw`), with the id bookkeeping and vector preparation they share.

Both are keyed by string track ids, support upsert and delete in place, and answer top-n by
inner product ("ip") or cosine ("cosine") with an exact exclusion set: they never return
fewer than n results while enough non-excluded tracks exist.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Literal, Protocol

import numpy as np

Space = Literal["ip", "cosine"]


class TrackIndex(Protocol):
    def upsert(self, ids: list[str], vectors: np.ndarray) -> None: ...
    def remove(self, ids: Iterable[str]) -> None: ...
    def query(self, vector: np.ndarray, n: int, exclude: Iterable[str] = ()) -> list[tuple[str, float]]: ...
    def ranked(self, vector: np.ndarray, k: int) -> Iterator[tuple[str, float]]: ...
    def vector(self, track_id: str) -> np.ndarray | None: ...
    def __len__(self) -> int: ...
    def __contains__(self, track_id: object) -> bool: ...


def prep(vectors: np.ndarray, space: Space) -> np.ndarray:
    v = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
    if space == "cosine":
        norms = np.linalg.norm(v, axis=1, keepdims=True)
        v = (v / np.where(norms == 0, 1.0, norms)).astype(np.float32)
    return np.ascontiguousarray(v)


class Slots:
    """String id ↔ integer label bookkeeping shared by both indexes."""

    def __init__(self) -> None:
        self.label: dict[str, int] = {}
        self.ids: list[str | None] = []

    def assign(self, ids: list[str]) -> np.ndarray:
        out = np.empty(len(ids), dtype=np.int64)
        for j, t in enumerate(ids):
            lab = self.label.get(t)
            if lab is None:
                lab = len(self.ids)
                self.label[t] = lab
                self.ids.append(t)
            out[j] = lab
        return out

    def drop(self, track_id: str) -> int | None:
        lab = self.label.pop(track_id, None)
        if lab is not None:
            self.ids[lab] = None
        return lab


class ExactIndex:
    """Brute-force search over a dense matrix; the reference every index is tested against."""

    def __init__(self, dim: int, space: Space = "ip") -> None:
        self.dim, self.space = dim, space
        self.slots = Slots()
        self.data = np.zeros((0, dim), dtype=np.float32)
        self.alive = np.zeros(0, dtype=bool)

    def upsert(self, ids: list[str], vectors: np.ndarray) -> None:
        labels = self.slots.assign(ids)
        need = int(labels.max()) + 1 if labels.size else 0
        if need > self.data.shape[0]:
            grow = max(need, 2 * self.data.shape[0])
            self.data = np.vstack([self.data, np.zeros((grow - self.data.shape[0], self.dim), np.float32)])
            self.alive = np.concatenate([self.alive, np.zeros(grow - self.alive.size, bool)])
        self.data[labels] = prep(vectors, self.space)
        self.alive[labels] = True

    def remove(self, ids: Iterable[str]) -> None:
        for t in ids:
            lab = self.slots.drop(t)
            if lab is not None:
                self.alive[lab] = False

    def query(self, vector: np.ndarray, n: int, exclude: Iterable[str] = ()) -> list[tuple[str, float]]:
        scores = self.data @ prep(vector, self.space)[0]
        scores[~self.alive] = -np.inf
        for t in exclude:
            lab = self.slots.label.get(t)
            if lab is not None:
                scores[lab] = -np.inf
        m = min(n, scores.size)
        if m == 0:
            return []
        top = np.argpartition(-scores, m - 1)[:m]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(str(self.slots.ids[i]), float(scores[i])) for i in top if np.isfinite(scores[i])]

    def ranked(self, vector: np.ndarray, k: int) -> Iterator[tuple[str, float]]:
        """The k best live tracks, best first, produced as the caller reads them."""
        return iter(self.query(vector, k))

    def vector(self, track_id: str) -> np.ndarray | None:
        lab = self.slots.label.get(track_id)
        return None if lab is None else self.data[lab].copy()

    def __len__(self) -> int:
        return len(self.slots.label)

    def __contains__(self, track_id: object) -> bool:
        return track_id in self.slots.label
