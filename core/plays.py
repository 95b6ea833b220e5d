"""Validation of raw play-count matrices, shared by training and fold-in."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp

from core.errors import InvalidPlaysError


def check_plays(plays: object, name: str = "plays", n_cols: int | None = None) -> sp.csr_matrix:
    """Validate a raw play-count matrix and return it as float32 CSR with sorted indices."""
    if not sp.issparse(plays):
        if isinstance(plays, np.ndarray) and plays.ndim == 2 and n_cols is not None:
            plays = sp.csr_matrix(plays)
        else:
            raise InvalidPlaysError(f"{name} must be a scipy.sparse matrix, got {type(plays).__name__}")
    m = sp.csr_matrix(plays, dtype=np.float32)
    if m.ndim != 2:
        raise InvalidPlaysError(f"{name} must be 2-D, got shape {m.shape}")
    if n_cols is not None and m.shape[1] != n_cols:
        raise InvalidPlaysError(f"{name} has {m.shape[1]} columns, the model expects {n_cols}")
    if not np.all(np.isfinite(m.data)):
        raise InvalidPlaysError(f"{name} contains NaN or infinite play counts")
    if m.data.size and m.data.min() < 0:
        raise InvalidPlaysError(f"{name} contains negative play counts")
    m.eliminate_zeros()
    m.sum_duplicates()
    m.sort_indices()
    return m


def with_confidence(m: sp.csr_matrix, confidence_of: Callable[[np.ndarray], np.ndarray]) -> sp.csr_matrix:
    """`m` with confidences for values; shares `m`'s index arrays (read-only in the kernels)."""
    return sp.csr_matrix((confidence_of(m.data), m.indices, m.indptr), shape=m.shape, copy=False)
