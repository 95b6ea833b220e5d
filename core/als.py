"""Implicit-feedback ALS (Hu, Koren & Volinsky 2008) with exact fold-in.

scikit-learn style: `__init__` stores parameters, `fit` validates and computes,
fitted attributes end in `_`. Models are saved as `.npz` without pickle.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp

from core import als_kernels
from core.errors import DivergedError, InvalidPlaysError, NotFittedError

Confidence = Literal["log", "linear"]
Solver = Literal["cg", "cholesky"]
SERIAL_ROWS = 8  # fold-ins of at most this many rows are solved on the calling thread


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


class ImplicitALS:
    """Implicit ALS with conjugate-gradient or Cholesky solves, float32 factors."""

    def __init__(
        self,
        factors: int = 64,
        regularization: float = 0.05,
        alpha: float = 2.0,
        iterations: int = 15,
        confidence: Confidence = "log",
        epsilon: float = 1.0,
        solver: Solver = "cg",
        cg_steps: int = 3,
        random_state: int | None = None,
    ) -> None:
        self.factors = factors
        self.regularization = regularization
        self.alpha = alpha
        self.iterations = iterations
        self.confidence = confidence
        self.epsilon = epsilon
        self.solver = solver
        self.cg_steps = cg_steps
        self.random_state = random_state

    # ---- parameters -------------------------------------------------------------
    def get_params(self) -> dict[str, object]:
        return {
            k: getattr(self, k)
            for k in (
                "factors",
                "regularization",
                "alpha",
                "iterations",
                "confidence",
                "epsilon",
                "solver",
                "cg_steps",
                "random_state",
            )
        }

    def _check_params(self) -> None:
        if not (isinstance(self.factors, int) and self.factors > 0):
            raise ValueError(f"factors must be a positive int, got {self.factors!r}")
        if self.regularization < 0 or self.alpha <= 0 or self.epsilon <= 0:
            raise ValueError("regularization must be >= 0, alpha and epsilon > 0")
        if self.confidence not in ("log", "linear"):
            raise ValueError(f"confidence must be 'log' or 'linear', got {self.confidence!r}")
        if self.solver not in ("cg", "cholesky"):
            raise ValueError(f"solver must be 'cg' or 'cholesky', got {self.solver!r}")
        if self.iterations < 0 or self.cg_steps < 1:
            raise ValueError("iterations must be >= 0 and cg_steps >= 1")

    def confidence_of(self, plays: np.ndarray) -> np.ndarray:
        """Confidence c = 1 + α·plays or 1 + α·log(1 + plays/ε), float32."""
        c = np.array(plays, dtype=np.float32)  # one new array, the rest in place (fit's memory peak)
        if self.confidence == "log":
            c /= np.float32(self.epsilon)
            np.log1p(c, out=c)
        c *= np.float32(self.alpha)
        c += np.float32(1.0)
        return c

    # ---- training ---------------------------------------------------------------
    def fit(
        self,
        plays: sp.spmatrix,
        callback: Callable[[int, float], None] | None = None,
        init: tuple[np.ndarray, np.ndarray] | None = None,
        consume_init: bool = False,
    ) -> ImplicitALS:
        """Train on a users × tracks matrix of raw play counts; returns self.

        `init` = (user, track) factors to continue from (a refit after evaluation on a holdout
        needs a few iterations from there, not a fit from random). `init` stays intact unless
        `consume_init`: then float32 C arrays are updated in place rather than copied (a refit
        whose starting model is not needed afterwards saves one copy of the factors: 1.5 GB
        at 5M users × 1M tracks)."""
        self._check_params()
        ui = check_plays(plays)
        if ui.nnz == 0:
            raise InvalidPlaysError("plays is empty: no positive play counts to learn from")
        n_users, n_items = ui.shape
        conf_ui = self._with_confidence(ui)
        conf_iu = conf_ui.T.tocsr()
        conf_iu.sort_indices()
        if init is not None:
            X, Y = (np.array(f, dtype=np.float32, order="C", copy=None if consume_init else True) for f in init)
            if X.shape != (n_users, self.factors) or Y.shape != (n_items, self.factors):
                raise ValueError(f"init shapes {X.shape}, {Y.shape} do not fit plays {ui.shape} × {self.factors}")
        else:
            rng = np.random.default_rng(self.random_state)
            # drawn in float32: float64 draws were the fit's memory peak (2 × 8 bytes per entry)
            X = rng.standard_normal((n_users, self.factors), dtype=np.float32)
            Y = rng.standard_normal((n_items, self.factors), dtype=np.float32)
            X *= np.float32(0.01)
            Y *= np.float32(0.01)
        self.iteration_seconds_: list[float] = []
        for it in range(self.iterations):
            t0 = time.perf_counter()
            self._half_step(conf_ui, Y, X)
            self._half_step(conf_iu, X, Y)
            self.iteration_seconds_.append(time.perf_counter() - t0)
            if callback is not None:
                callback(it, self.iteration_seconds_[-1])
        if not (np.all(np.isfinite(X)) and np.all(np.isfinite(Y))):
            raise DivergedError("ALS produced non-finite factors; lower alpha or raise regularization")
        self.user_factors_ = X
        self.item_factors_ = Y
        return self

    def _with_confidence(self, m: sp.csr_matrix) -> sp.csr_matrix:
        """`m` with confidences for values; shares `m`'s index arrays (read-only in the kernels)."""
        return sp.csr_matrix((self.confidence_of(m.data), m.indices, m.indptr), shape=m.shape, copy=False)

    def _gram(self, F: np.ndarray, dtype: type) -> np.ndarray:
        return als_kernels.gram(F, self.regularization, dtype)

    def _half_step(self, conf: sp.csr_matrix, Y: np.ndarray, X: np.ndarray) -> None:
        if self.solver == "cg":
            als_kernels.cg_half_step(
                conf.indptr, conf.indices, conf.data, Y, self._gram(Y, np.float32), X, self.cg_steps
            )
        else:
            als_kernels.cholesky_half_step(conf.indptr, conf.indices, conf.data, Y, self._gram(Y, np.float64), X)

    def loss(self, plays: sp.spmatrix) -> float:
        """The weighted squared loss plus L2 penalty of the fitted factors on `plays`."""
        self._check_fitted()
        ui = check_plays(plays, n_cols=self.item_factors_.shape[0])
        X = self.user_factors_.astype(np.float64)
        Y = self.item_factors_.astype(np.float64)
        total = float(np.einsum("uf,fg,ug->", X, Y.T @ Y, X))  # Σ_u Σ_i (x_u·y_i)²
        coo = ui.tocoo()
        c = self.confidence_of(coo.data).astype(np.float64)
        for s in range(0, coo.nnz, 1 << 20):
            r, col, cc = coo.row[s : s + (1 << 20)], coo.col[s : s + (1 << 20)], c[s : s + (1 << 20)]
            p = np.einsum("nf,nf->n", X[r], Y[col])
            total += float(np.sum(cc * (1.0 - p) ** 2 - p**2))
        return total + self.regularization * float((X**2).sum() + (Y**2).sum())

    # ---- fold-in ----------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "item_factors_"):
            raise NotFittedError("this ImplicitALS is not fitted yet: call fit() or load()")

    def fold_in(
        self,
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
        conf = self._with_confidence(m)
        frozen = np.ascontiguousarray(frozen, dtype=np.float32)
        k = frozen.shape[1]
        if gram is None:
            full = self._gram(frozen, np.float64)
        else:
            full = np.asarray(gram, dtype=np.float64) + self.regularization * np.eye(k)
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
            n_steps = steps if steps is not None else max(self.cg_steps, 3)
            als_kernels.cg_half_step(sub.indptr, sub.indices, sub.data, frozen, full.astype(np.float32), x, n_steps)
            out[hot] = x
        return out

    def warm_fold_in(self, frozen: np.ndarray, gram: np.ndarray | None = None) -> None:
        """Compile (or load from numba's disk cache) the three kernels `fold_in` may call: the
        first call of each took 0.3-0.6 s, which the first plays after a start waited for."""
        n = SERIAL_ROWS + 1
        ones = np.ones(n, dtype=np.float32)
        rows = sp.csr_matrix((ones, (np.arange(n), np.zeros(n, dtype=np.int64))), shape=(n, frozen.shape[0]))
        self.fold_in(rows[:1], frozen, gram)  # a few rows: Cholesky on this thread
        self.fold_in(rows, frozen, gram)  # more: Cholesky in parallel
        self.fold_in(rows, frozen, gram, start=np.ones((n, frozen.shape[1]), dtype=np.float32))  # warm: CG

    def fold_in_one(self, rows: np.ndarray, plays: np.ndarray, frozen: np.ndarray, gram: np.ndarray) -> np.ndarray:
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
        cols, conf = cols[keep].astype(np.int32), self.confidence_of(summed[keep])
        k = frozen.shape[1]
        x = np.zeros((1, k), dtype=np.float32)
        full = np.asarray(gram, dtype=np.float64) + self.regularization * np.eye(k)
        indptr = np.array([0, cols.size], dtype=np.int32)
        als_kernels.cholesky_rows_serial(indptr, cols, conf, np.ascontiguousarray(frozen, np.float32), full, x)
        return x[0]

    def fold_in_users(self, rows: object) -> np.ndarray:
        """Exact solve of n users (n × n_tracks raw plays) against the frozen track factors."""
        self._check_fitted()
        return self.fold_in(_named(rows, self.item_factors_.shape[0], "rows"), self.item_factors_)

    def fold_in_items(self, cols: object) -> np.ndarray:
        """Exact solve of n tracks (n × n_users raw plays) against the frozen user factors."""
        self._check_fitted()
        return self.fold_in(_named(cols, self.user_factors_.shape[0], "cols"), self.user_factors_)

    # ---- persistence ------------------------------------------------------------
    def save(self, path: str | Path, **extra: Any) -> None:
        """Write factors, parameters and any extra arrays (e.g. id maps) to an .npz."""
        self._check_fitted()
        np.savez(
            path,
            user_factors=self.user_factors_,
            item_factors=self.item_factors_,
            params=np.array(json.dumps(self.get_params())),
            **extra,
        )

    @classmethod
    def load(cls, path: str | Path) -> ImplicitALS:
        """Load a model saved by `save` (no pickle); NaN factors raise."""
        with np.load(path, allow_pickle=False) as z:
            model = cls(**json.loads(str(z["params"])))
            model.user_factors_ = z["user_factors"].astype(np.float32)
            model.item_factors_ = z["item_factors"].astype(np.float32)
        if not (np.all(np.isfinite(model.user_factors_)) and np.all(np.isfinite(model.item_factors_))):
            raise DivergedError(f"{path}: stored factors contain NaN or inf")
        return model


def _named(m: object, n_cols: int, name: str) -> sp.csr_matrix:
    """Validate with the caller's argument name in the message."""
    return check_plays(m, name=name, n_cols=n_cols)
