"""What a published model version carries besides its vectors: the meta fields serving and the
speed layer read, computed from the fitted model alone (no Redis: the store writes them).

The arrays are the user Gram matrix (fold-in's regulariser, summed in float64 by blocks) and a
sample of user vectors (what each serving replica tunes its HNSW search breadth on).
"""

from __future__ import annotations

import json
import time

import numpy as np

from core.als import ImplicitALS
from core.als_kernels import gram

QUERY_SAMPLE = 1024  # user vectors shipped for ef tuning: more queries, a tighter recall bound, a narrower ef


def query_sample(users: np.ndarray, size: int = QUERY_SAMPLE, seed: int = 0) -> np.ndarray:
    """Up to `size` random non-zero user vectors: what serving tunes its search breadth on."""
    live = np.flatnonzero(np.any(users != 0, axis=1))
    pick = np.sort(np.random.default_rng(seed).choice(live, size=min(size, live.size), replace=False))
    return np.ascontiguousarray(users[pick], dtype="<f4")


def version_meta(model: ImplicitALS, n_users: int, n_tracks: int, meta: dict[str, object]) -> dict[str, str | bytes]:
    """The caller's fields (non-text ones as JSON), the model's shape and parameters, and the
    arrays above as little-endian bytes."""
    full = {k: (v if isinstance(v, str | bytes) else json.dumps(v)) for k, v in meta.items()}
    full.update(
        {
            "factors": str(model.factors),
            "params": json.dumps(model.get_params()),
            "n_users": str(n_users),
            "n_tracks": str(n_tracks),
            "user_gram": gram(model.user_factors_, 0.0, np.float64).astype("<f8").tobytes(),
            "query_sample": query_sample(model.user_factors_).tobytes(),
        }
    )
    full.setdefault("trained_at", str(time.time()))
    return full
