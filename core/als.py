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
from core import fold_in as fi
from core.errors import DivergedError, InvalidPlaysError, NotFittedError
from core.plays import check_plays, with_confidence

Confidence = Literal["log", "linear"]
Solver = Literal["cg", "cholesky"]


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
        # Factor rows on cache-line boundaries (`als_kernels.cache_aligned`).
        shapes = (n_users, self.factors), (n_items, self.factors)
        if init is not None:
            if tuple(init[0].shape) != shapes[0] or tuple(init[1].shape) != shapes[1]:
                got = f"{init[0].shape}, {init[1].shape}"
                raise ValueError(f"init shapes {got} do not fit plays {ui.shape} × {self.factors}")
            if consume_init:  # in place where they are float32 C arrays already (aligned if ours)
                X, Y = (np.array(f, dtype=np.float32, order="C", copy=None) for f in init)
            else:
                X, Y = (als_kernels.cache_aligned(shape, f) for shape, f in zip(shapes, init, strict=True))
        else:
            rng = np.random.default_rng(self.random_state)
            # drawn in float32: float64 draws were the fit's memory peak (2 × 8 bytes per entry)
            X, Y = als_kernels.cache_aligned(shapes[0]), als_kernels.cache_aligned(shapes[1])
            rng.standard_normal(out=X, dtype=np.float32)
            rng.standard_normal(out=Y, dtype=np.float32)
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
        return with_confidence(m, self.confidence_of)

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

    # The solves live in core/fold_in.py; bound here as methods (self is the `model` they take).
    fold_in = fi.fold_in
    warm_fold_in = fi.warm_fold_in
    fold_in_one = fi.fold_in_one

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
