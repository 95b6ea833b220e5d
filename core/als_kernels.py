"""Hot loops of implicit ALS: one half-step over CSR rows, in numba, parallel over rows.

Notation (Hu, Koren & Volinsky): for a row u with observed columns i and confidence c_i,
    A_u = YᵀY + λI + Σ_i (c_i − 1) y_i y_iᵀ,   b_u = Σ_i c_i y_i,   x_u = A_u⁻¹ b_u.
`YtY` passed in already includes λI, so the cost grows with the number of plays.
The kernels avoid temporary arrays in inner loops: each thread chunk owns its buffers.
"""

from __future__ import annotations

import functools
from typing import Any

import numba
import numpy as np
from numba import prange

_CHUNK = 256
_GRAM_BLOCK = 1 << 16


def cg_half_step(
    indptr: np.ndarray,
    indices: np.ndarray,
    conf: np.ndarray,
    Y: np.ndarray,
    YtY: np.ndarray,
    X: np.ndarray,
    steps: int,
) -> None:
    """Update X in place with `steps` conjugate-gradient steps per row, warm-started."""
    _cg_kernel(X.shape[1])(indptr, indices, conf, Y, YtY, X, steps)


@functools.cache
def _cg_kernel(k: int) -> Any:
    """The CG kernel compiled for k factors as a constant (bench.als: about a third faster than
    reading k from the array; LLVM unrolls the length-k loops into whole vector registers).
    Dense products are in axpy form, `ap += p[g]·YtY[g]`, so no loop ends in a horizontal sum.
    Each k is compiled once and cached on disk like the other kernels."""

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def kernel(
        indptr: np.ndarray,
        indices: np.ndarray,
        conf: np.ndarray,
        Y: np.ndarray,
        YtY: np.ndarray,
        X: np.ndarray,
        steps: int,
    ) -> None:
        n_rows = X.shape[0]
        n_chunks = (n_rows + _CHUNK - 1) // _CHUNK
        for c in prange(n_chunks):
            x = np.empty(k, dtype=np.float32)
            r = np.empty(k, dtype=np.float32)
            p = np.empty(k, dtype=np.float32)
            ap = np.empty(k, dtype=np.float32)
            for u in range(c * _CHUNK, min((c + 1) * _CHUNK, n_rows)):
                start = indptr[u]
                end = indptr[u + 1]
                if start == end:
                    for f in range(k):
                        X[u, f] = 0.0
                    continue
                # r = b - A x, with A x = YtY x + Σ (c_i - 1)(y_i·x) y_i and b = Σ c_i y_i
                for f in range(k):
                    x[f] = X[u, f]
                    r[f] = 0.0
                for g in range(k):
                    xg = -x[g]
                    for f in range(k):
                        r[f] += xg * YtY[g, f]
                for j in range(start, end):
                    i = indices[j]
                    ci = conf[j]
                    dot = np.float32(0.0)
                    for f in range(k):
                        dot += Y[i, f] * x[f]
                    w = ci - (ci - np.float32(1.0)) * dot
                    for f in range(k):
                        r[f] += w * Y[i, f]
                rsold = np.float32(0.0)
                for f in range(k):
                    p[f] = r[f]
                    rsold += r[f] * r[f]
                for _ in range(steps):
                    if rsold < 1e-20:
                        break
                    for f in range(k):
                        ap[f] = 0.0
                    for g in range(k):
                        pg = p[g]
                        for f in range(k):
                            ap[f] += pg * YtY[g, f]
                    for j in range(start, end):
                        i = indices[j]
                        dot = np.float32(0.0)
                        for f in range(k):
                            dot += Y[i, f] * p[f]
                        w = (conf[j] - np.float32(1.0)) * dot
                        for f in range(k):
                            ap[f] += w * Y[i, f]
                    pap = np.float32(0.0)
                    for f in range(k):
                        pap += p[f] * ap[f]
                    if pap <= 0.0:
                        break
                    alpha = rsold / pap
                    rsnew = np.float32(0.0)
                    for f in range(k):
                        x[f] += alpha * p[f]
                        r[f] -= alpha * ap[f]
                        rsnew += r[f] * r[f]
                    beta = rsnew / rsold
                    for f in range(k):
                        p[f] = r[f] + beta * p[f]
                    rsold = rsnew
                for f in range(k):
                    X[u, f] = x[f]

    return kernel


def cache_aligned(shape: tuple[int, int], like: np.ndarray | None = None) -> np.ndarray:
    """A float32 C array whose first row starts on a 64-byte cache-line boundary (a copy of
    `like` when given, else uninitialised). Why: numpy's large arrays start 16 bytes into a page,
    so each 256-byte row of 64 factors straddles five cache lines instead of four, and a
    half-step's first pass gathers rows at random from arrays larger than the caches. Aligned,
    an iteration at 10M plays took 0.93 s against 1.04 s (median of four alternated rounds)."""
    n_bytes = shape[0] * shape[1] * 4
    raw = np.empty(n_bytes + 64, dtype=np.uint8)
    skip = -raw.ctypes.data % 64
    out = raw[skip : skip + n_bytes].view(np.float32).reshape(shape)
    if like is not None:
        out[...] = like
    return out


def gram(F: np.ndarray, reg: float, dtype: type = np.float32) -> np.ndarray:
    """FᵀF + reg·I, summed in float64 over blocks of rows.

    For CG the products are float32 (a sgemm per block, summed in float64); for Cholesky,
    float64 products. Neither copies F whole: a float64 copy of the user factors took a
    quarter of an iteration at 10M plays and set the fit's memory peak."""
    k = F.shape[1]
    work = np.float64 if dtype == np.float64 else np.float32
    G = np.zeros((k, k))
    for s in range(0, F.shape[0], _GRAM_BLOCK):
        b: np.ndarray = F[s : s + _GRAM_BLOCK].astype(work, copy=False)
        G += np.asarray(b.T @ b, dtype=np.float64)
    G[np.diag_indices(k)] += reg
    return G.astype(dtype)


@numba.njit(cache=True, nogil=True)
def _cholesky_row(
    u: int,
    indptr: np.ndarray,
    indices: np.ndarray,
    conf: np.ndarray,
    Y: np.ndarray,
    YtY: np.ndarray,
    X: np.ndarray,
    A: np.ndarray,
    b: np.ndarray,
) -> None:
    """Row u's exact solve into X[u] (0 with no plays); A and b are the caller's buffers."""
    k = X.shape[1]
    start = indptr[u]
    end = indptr[u + 1]
    if start == end:
        for f in range(k):
            X[u, f] = 0.0
        return
    for f in range(k):
        b[f] = 0.0
        for g in range(k):
            A[f, g] = YtY[f, g]
    for j in range(start, end):
        i = indices[j]
        ci = conf[j]
        for f in range(k):
            yf = Y[i, f]
            b[f] += ci * yf
            w = (ci - 1.0) * yf
            for g in range(k):
                A[f, g] += w * Y[i, g]
    L = np.linalg.cholesky(A)
    # Two triangular substitutions in place of general solves (each an LU of 64×64: most of a
    # one-row fold-in's time). b becomes z (L z = b), then x (Lᵀ x = z).
    for f in range(k):
        acc = b[f]
        for g in range(f):
            acc -= L[f, g] * b[g]
        b[f] = acc / L[f, f]
    for f in range(k - 1, -1, -1):
        acc = b[f]
        for g in range(f + 1, k):
            acc -= L[g, f] * b[g]
        b[f] = acc / L[f, f]
    for f in range(k):
        X[u, f] = b[f]


@numba.njit(parallel=True, cache=True, nogil=True)
def cholesky_half_step(
    indptr: np.ndarray,
    indices: np.ndarray,
    conf: np.ndarray,
    Y: np.ndarray,
    YtY: np.ndarray,
    X: np.ndarray,
) -> None:
    """Solve every row exactly (float64 normal equations, Cholesky); rows with no plays get 0."""
    n_rows = X.shape[0]
    k = X.shape[1]
    n_chunks = (n_rows + _CHUNK - 1) // _CHUNK
    for c in prange(n_chunks):
        A = np.empty((k, k), dtype=np.float64)
        b = np.empty(k, dtype=np.float64)
        for u in range(c * _CHUNK, min((c + 1) * _CHUNK, n_rows)):
            _cholesky_row(u, indptr, indices, conf, Y, YtY, X, A, b)


@numba.njit(cache=True, nogil=True)
def cholesky_rows_serial(
    indptr: np.ndarray,
    indices: np.ndarray,
    conf: np.ndarray,
    Y: np.ndarray,
    YtY: np.ndarray,
    X: np.ndarray,
) -> None:
    """`cholesky_half_step` on the calling thread, for a few rows (an anonymous listener per
    request): a parallel region per request cost more than the solve, and its idle threads spin.
    A function of its own, not a serial build of the other: numba's disk cache would mix them."""
    k = X.shape[1]
    A = np.empty((k, k), dtype=np.float64)
    b = np.empty(k, dtype=np.float64)
    for u in range(X.shape[0]):
        _cholesky_row(u, indptr, indices, conf, Y, YtY, X, A, b)


def reference_half_step(
    indptr: np.ndarray, indices: np.ndarray, conf: np.ndarray, Y: np.ndarray, reg: float
) -> np.ndarray:
    """Readable dense closed-form half-step; the fast kernels are tested against this."""
    Y64 = Y.astype(np.float64)
    k = Y.shape[1]
    base = Y64.T @ Y64 + reg * np.eye(k)
    out = np.zeros((len(indptr) - 1, k))
    for u in range(len(indptr) - 1):
        cols = indices[indptr[u] : indptr[u + 1]]
        if len(cols) == 0:
            continue
        c = conf[indptr[u] : indptr[u + 1]].astype(np.float64)
        Yu = Y64[cols]
        A = base + (Yu.T * (c - 1.0)) @ Yu
        out[u] = np.linalg.solve(A, Yu.T @ c)
    return out
