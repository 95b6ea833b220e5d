"""The head band of an inner-product index, searched exactly: a dense copy of its vectors scanned
by one compiled loop that keeps the k best as it goes.

Why: the head band (the longest 2 % of vectors, `core.hnsw`) holds most of a user's true top 10
(93 % on 200k ALS-like tracks), so its graph had to be searched wide (ef 120), which took 61 µs
per query on 4,000 tracks, as long as the 196,000-track tail at ef 60. Scanning those 4,000
vectors took 23 µs and finds every one of them, so the tail's breadth is tuned for the few true
top items left to it. numpy was no help here: a 4,000-row product and an argpartition took
~70 µs. The graph of the band is still kept (snapshots, stored vectors); only its search is
replaced, and only while the band has at most `EXACT_BAND_MAX` vectors (a scan grows linearly:
~100 µs at 20,000).
"""

from __future__ import annotations

from collections.abc import Callable

import numba
import numpy as np

EXACT_BAND_MAX = 32_768


@numba.njit(fastmath=True, nogil=True, boundscheck=False, cache=True)
def _top_k(
    rows: np.ndarray, alive: np.ndarray, n: int, q: np.ndarray, k: int, out_row: np.ndarray, out_score: np.ndarray
) -> int:
    """For each query, the k live rows of largest inner product, best first (ties: lower row
    first); returns how many there were (k, or fewer live rows)."""
    dim = rows.shape[1]
    got = 0
    for a in range(q.shape[0]):
        got = 0
        thr = -np.inf
        for i in range(n):
            if not alive[i]:
                continue
            s = np.float32(0.0)
            for j in range(dim):
                s += rows[i, j] * q[a, j]
            if got < k or s > thr:
                pos = got if got < k else k - 1
                while pos > 0 and out_score[a, pos - 1] < s:
                    out_score[a, pos] = out_score[a, pos - 1]
                    out_row[a, pos] = out_row[a, pos - 1]
                    pos -= 1
                out_score[a, pos] = s
                out_row[a, pos] = i
                if got < k:
                    got += 1
                if got == k:
                    thr = out_score[a, k - 1]
    return got


class ExactBand:
    """Dense rows with their graph labels; removals mark a row dead, compacted once half are."""

    def __init__(self, dim: int, capacity: int = 1024) -> None:
        self.rows = np.zeros((max(capacity, 16), dim), dtype=np.float32)
        self.labels = np.zeros(len(self.rows), dtype=np.uint64)  # as hnswlib returns them: merged without casts
        self.alive = np.zeros(len(self.rows), dtype=np.bool_)
        self.used = 0  # rows written so far, live or dead
        self.row_of: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.row_of)

    def add(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        """Vectors already prepared for the index's space, under fresh graph labels."""
        if self.used + len(labels) > len(self.rows):
            self._compact(len(labels))
        at = self.used
        self.rows[at : at + len(labels)] = vectors
        self.labels[at : at + len(labels)] = labels
        self.alive[at : at + len(labels)] = True
        for j, lab in enumerate(labels.tolist()):
            self.row_of[lab] = at + j
        self.used += len(labels)

    def remove(self, label: int) -> None:
        row = self.row_of.pop(label, None)
        if row is not None:
            self.alive[row] = False

    def _compact(self, extra: int) -> None:
        """Drop dead rows; grow (doubling) when the live ones and `extra` do not fit."""
        keep = np.flatnonzero(self.alive[: self.used])
        size = max(len(self.rows), 16)
        while len(keep) + extra > size * 3 // 4:  # room to spare, so the next add does not compact again
            size *= 2
        rows = np.zeros((size, self.rows.shape[1]), dtype=np.float32)
        rows[: len(keep)] = self.rows[keep]
        labels = np.zeros(size, dtype=np.uint64)
        labels[: len(keep)] = self.labels[keep]
        alive = np.zeros(size, dtype=np.bool_)
        alive[: len(keep)] = True
        self.rows, self.labels, self.alive, self.used = rows, labels, alive, len(keep)
        self.row_of = {lab: i for i, lab in enumerate(labels[: len(keep)].tolist())}

    def knn(self, q: np.ndarray, k: int, admits: Callable[[int], bool] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """hnswlib's answer shape for prepared queries `q`: (labels, 1 - score), (queries, k),
        best first. Like hnswlib, a RuntimeError when fewer than k rows are live or pass `admits`."""
        if admits is not None:
            return self._filtered(q, k, admits)
        out_row = np.empty((len(q), k), dtype=np.int64)
        out_score = np.empty((len(q), k), dtype=np.float32)
        if _top_k(self.rows, self.alive, self.used, q, k, out_row, out_score) < k:
            raise RuntimeError(f"the exact band holds fewer than {k} live vectors")
        return self.labels[out_row], (1.0 - out_score).astype(np.float32)

    def _filtered(self, q: np.ndarray, k: int, admits: Callable[[int], bool]) -> tuple[np.ndarray, np.ndarray]:
        """Every live row scored, then read best first until k pass (`admits` is a Python call)."""
        labels = np.empty((len(q), k), dtype=np.uint64)
        dist = np.empty((len(q), k), dtype=np.float32)
        live = np.flatnonzero(self.alive[: self.used])
        for a in range(len(q)):
            scores = self.rows[live] @ q[a]
            got = 0
            for i in np.argsort(-scores, kind="stable").tolist():
                lab = int(self.labels[live[i]])
                if admits(lab):
                    labels[a, got], dist[a, got] = lab, 1.0 - scores[i]
                    got += 1
                    if got == k:
                        break
            if got < k:
                raise RuntimeError(f"fewer than {k} vectors of the exact band pass the filter")
        return labels, dist
