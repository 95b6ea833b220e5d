"""Exact recommendation maths: the reference that the HNSW index is tested against."""

from __future__ import annotations

import numba
import numpy as np
import scipy.sparse as sp
from numba import prange


def masked_scores(user_vectors: np.ndarray, item_factors: np.ndarray, exclude: sp.csr_matrix | None) -> np.ndarray:
    """Inner-product scores of a batch of users, with each row's excluded items at -inf."""
    scores = np.atleast_2d(np.asarray(user_vectors, dtype=np.float32)) @ item_factors.T
    if exclude is not None:
        block = exclude.tocoo()
        scores[block.row, block.col] = -np.inf
    return scores


@numba.njit(nogil=True, inline="always")
def _top_row(scores: np.ndarray, r: int, idx: np.ndarray, val: np.ndarray) -> None:
    """Row r's m best (m = idx.shape[1]) in a sorted buffer, one pass (ties: earlier column first)."""
    m = idx.shape[1]
    filled = 0
    for c in range(scores.shape[1]):
        s = scores[r, c]
        if not s > val[r, m - 1] or not s > -np.inf:  # also skips NaN
            continue
        pos = filled if filled < m else m - 1
        while pos > 0 and val[r, pos - 1] < s:
            val[r, pos] = val[r, pos - 1]
            idx[r, pos] = idx[r, pos - 1]
            pos -= 1
        val[r, pos] = s
        idx[r, pos] = c
        if filled < m:
            filled += 1


@numba.njit(nogil=True, inline="always")
def _top_buffers(scores: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: m indices at -1 and m scores at -inf (the empty top list)."""
    idx = np.full((scores.shape[0], m), -1, dtype=np.int64)
    val = np.empty((scores.shape[0], m), dtype=scores.dtype)
    val[:] = -np.inf
    return idx, val


@numba.njit(parallel=True, cache=True, nogil=True)
def _top_rows(scores: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Every row on numba's threads."""
    idx, val = _top_buffers(scores, m)
    for r in prange(scores.shape[0]):
        _top_row(scores, r, idx, val)
    return idx, val


# The same pass on the calling thread, for a process that forks afterwards (`encore serve`'s
# parent tunes its graphs before forking the workers, and GNU OpenMP's threads do not survive a
# fork). A function of its own: numba's on-disk cache is keyed by the Python function, so one
# compiled from `_top_rows.py_func` loaded the threaded machine code whenever that was cached first.
@numba.njit(cache=True, nogil=True)
def _top_rows_serial(scores: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    idx, val = _top_buffers(scores, m)
    for r in range(scores.shape[0]):
        _top_row(scores, r, idx, val)
    return idx, val


def top_of_scores(scores: np.ndarray, n: int, threads: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the indices and scores of the min(n, columns) best entries, best first.

    Entries at -inf never fill the list: their slots hold index -1. Small n (the usual case)
    takes a single compiled pass per row; argpartition was ~3 ms a row at 200k columns.
    `threads=False` keeps it on the calling thread.
    """
    n_items = scores.shape[1]
    m = min(n, n_items)
    if 0 < m <= 128 and scores.dtype in (np.float32, np.float64):
        kernel = _top_rows if threads else _top_rows_serial
        return kernel(np.ascontiguousarray(scores), m)  # type: ignore[no-any-return]
    if m < n_items:
        part = np.argpartition(-scores, m - 1, axis=1)[:, :m]
    else:
        part = np.tile(np.arange(n_items), (scores.shape[0], 1))
    ps = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-ps, axis=1, kind="stable")
    top = np.take_along_axis(part, order, axis=1)
    top_scores = np.take_along_axis(ps, order, axis=1)
    top[~np.isfinite(top_scores)] = -1
    return top, top_scores


def top_n(
    user_vectors: np.ndarray,
    item_factors: np.ndarray,
    n: int,
    exclude: sp.csr_matrix | None = None,
    batch: int = 512,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-n items by inner product for each user vector, excluding each row of `exclude`.

    Returns (indices, scores), both n_users × min(n, n_items); excluded slots never fill the
    list, and when fewer than n eligible items exist the tail holds index -1 and score -inf.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    U = np.atleast_2d(np.asarray(user_vectors, dtype=np.float32))
    m = min(n, item_factors.shape[0])
    idx_out = np.full((U.shape[0], m), -1, dtype=np.int64)
    score_out = np.full((U.shape[0], m), -np.inf, dtype=np.float32)
    for s in range(0, U.shape[0], batch):
        block = None if exclude is None else exclude[s : s + batch]
        idx_out[s : s + batch], score_out[s : s + batch] = top_of_scores(
            masked_scores(U[s : s + batch], item_factors, block), n
        )
    return idx_out, score_out


def normalize_rows(F: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; zero rows stay zero."""
    norms = np.linalg.norm(F, axis=1, keepdims=True)
    return (F / np.where(norms == 0, 1.0, norms)).astype(np.float32)


def similar_items(item_factors: np.ndarray, item: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The n items most similar to `item` by cosine, the item itself excluded."""
    if not 0 <= item < item_factors.shape[0]:
        raise IndexError(f"item {item} out of range 0..{item_factors.shape[0] - 1}")
    normed = normalize_rows(item_factors)
    excl = sp.csr_matrix(([1.0], ([0], [item])), shape=(1, item_factors.shape[0]))
    idx, scores = top_n(normed[item : item + 1], normed, n, exclude=excl)
    return idx[0], scores[0]


def popular_items(plays: sp.spmatrix, n: int) -> np.ndarray:
    """Indices of the n tracks with the most listeners."""
    return popularity(plays, n)[0]


def popularity(plays: sp.spmatrix, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, shares) of the n tracks with the most listeners, where a track's share is the
    fraction of users who played it: the score the popular fallback answers with."""
    listeners = np.asarray((sp.csr_matrix(plays) > 0).sum(axis=0)).ravel()
    top = np.argsort(-listeners, kind="stable")[:n]
    return top, listeners[top] / max(plays.shape[0], 1)
