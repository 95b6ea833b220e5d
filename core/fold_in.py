"""Fold-in: re-solving rows (users or tracks) against the other side's frozen factors.

What the speed layer does per play and cold start does per new track: implicit ALS's half step
for a few rows, exact (Cholesky) from scratch or a few conjugate-gradient steps from a row's
current vector. `ImplicitALS` exposes these as methods; they live here, apart from training.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import scipy.sparse as sp

from core import als_kernels
from core.errors import InvalidPlaysError
from core.plays import check_plays, with_confidence

SERIAL_ROWS = 8  # fold-ins of at most this many rows are solved on the calling thread


class Solvable(Protocol):
    """What a fold-in needs of a model: its regularization, CG steps and confidence."""

    regularization: float
    cg_steps: int

    def confidence_of(self, plays: np.ndarray) -> np.ndarray: ...


def fold_in(
    model: Solvable,
    rows: object,
    frozen: np.ndarray,
    gram: np.ndarray | None = None,
    start: np.ndarray | None = None,
    steps: int | None = None,
) -> np.ndarray:
    """Least-squares solve of `rows` (raw plays over the columns of `frozen`).

    `gram` is FᵀF of the whole frozen side (without λ); pass it when `frozen` holds only the
    vectors the rows touch (the speed layer folds a track in from its listeners alone), or
    to avoid recomputing it per call. Rows are solved exactly (Cholesky) unless `start`
    gives them a non-zero current vector: those take `steps` (default max(cg_steps, 3))
    warm-started conjugate-gradient steps, which is what a single new play needs.
    """
    m = check_plays(rows, name="rows", n_cols=frozen.shape[0])
    conf = with_confidence(m, model.confidence_of)
    frozen = np.ascontiguousarray(frozen, dtype=np.float32)
    k = frozen.shape[1]
    if gram is None:
        full = als_kernels.gram(frozen, model.regularization, np.float64)
    else:
        full = np.asarray(gram, dtype=np.float64) + model.regularization * np.eye(k)
    out = np.zeros((m.shape[0], k), dtype=np.float32)
    warm = np.zeros(m.shape[0], dtype=bool)
    if start is not None:
        if start.shape != out.shape:
            raise ValueError(f"start has shape {start.shape}, expected {out.shape}")
        warm = np.isfinite(start).all(axis=1) & (start != 0).any(axis=1)
    cold = np.flatnonzero(~warm)
    if len(cold):
        sub = conf[cold] if len(cold) < m.shape[0] else conf
        x = np.zeros((len(cold), k), dtype=np.float32)
        solve = als_kernels.cholesky_rows_serial if len(cold) <= SERIAL_ROWS else als_kernels.cholesky_half_step
        solve(sub.indptr, sub.indices, sub.data, frozen, full, x)
        out[cold] = x
    hot = np.flatnonzero(warm)
    if len(hot) and start is not None:
        sub = conf[hot] if len(hot) < m.shape[0] else conf
        x = np.ascontiguousarray(start[hot], dtype=np.float32)
        n_steps = steps if steps is not None else max(model.cg_steps, 3)
        als_kernels.cg_half_step(sub.indptr, sub.indices, sub.data, frozen, full.astype(np.float32), x, n_steps)
        out[hot] = x
    return out


def warm_fold_in(model: Solvable, frozen: np.ndarray, gram: np.ndarray | None = None) -> None:
    """Compile (or load from numba's disk cache) the three kernels `fold_in` may call: the
    first call of each took 0.3-0.6 s, which the first plays after a start waited for."""
    n = SERIAL_ROWS + 1
    ones = np.ones(n, dtype=np.float32)
    rows = sp.csr_matrix((ones, (np.arange(n), np.zeros(n, dtype=np.int64))), shape=(n, frozen.shape[0]))
    fold_in(model, rows[:1], frozen, gram)  # a few rows: Cholesky on this thread
    fold_in(model, rows, frozen, gram)  # more: Cholesky in parallel
    fold_in(model, rows, frozen, gram, start=np.ones((n, frozen.shape[1]), dtype=np.float32))  # warm: CG


def fold_in_one(
    model: Solvable, rows: np.ndarray, plays: np.ndarray, frozen: np.ndarray, gram: np.ndarray
) -> np.ndarray:
    """One listener's exact vector from the `frozen` rows they played and how often (repeats
    add up): what `fold_in` gives for a one-row matrix, without building one (an anonymous
    request's path, where scipy's constructors cost three times the solve). `gram` as in
    `fold_in`, without λ."""
    rows = np.asarray(rows, dtype=np.int64)
    plays = np.asarray(plays, dtype=np.float32)
    if rows.shape != plays.shape or rows.ndim != 1:
        raise InvalidPlaysError(f"rows and plays must be 1-D of one length, got {rows.shape} and {plays.shape}")
    if rows.size and (rows.min() < 0 or rows.max() >= frozen.shape[0]):
        raise InvalidPlaysError(f"rows must lie in [0, {frozen.shape[0]})")
    if not np.all(np.isfinite(plays)) or (plays.size and plays.min() < 0):
        raise InvalidPlaysError("plays must be finite and non-negative")
    cols, where = np.unique(rows, return_inverse=True)
    summed = np.bincount(where, weights=plays, minlength=cols.size).astype(np.float32)
    keep = summed > 0
    cols, conf = cols[keep].astype(np.int32), model.confidence_of(summed[keep])
    k = frozen.shape[1]
    x = np.zeros((1, k), dtype=np.float32)
    full = np.asarray(gram, dtype=np.float64) + model.regularization * np.eye(k)
    indptr = np.array([0, cols.size], dtype=np.int32)
    als_kernels.cholesky_rows_serial(indptr, cols, conf, np.ascontiguousarray(frozen, np.float32), full, x)
    return x[0]
