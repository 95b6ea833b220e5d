"""One contract suite for every TrackIndex: exact (reference) and HNSW."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from core.hnsw import HNSWIndex
from core.index import ExactIndex

pytestmark = pytest.mark.unit
# the third: an HNSW index whose inner-product graph splits into norm bands from 100 tracks
IMPLS = [ExactIndex, HNSWIndex, functools.partial(HNSWIndex, split_at=100, head_share=0.1)]


def _vectors(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    """Clustered vectors with a spread of norms, like ALS track factors."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((50, dim))
    v = centers[rng.integers(0, 50, n)] + 0.7 * rng.standard_normal((n, dim))
    return (v * rng.lognormal(0, 0.3, (n, 1))).astype(np.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_upsert_query_remove(impl) -> None:
    idx = impl(dim=3)
    idx.upsert(["a", "b", "c"], np.array([[1, 0, 0], [0, 2, 0], [0, 0, 3]], dtype=np.float32))
    q = np.array([1, 1, 1], dtype=np.float32)
    assert [t for t, _ in idx.query(q, 3)] == ["c", "b", "a"]
    assert [t for t, _ in idx.query(q, 2, exclude=["c"])] == ["b", "a"]
    idx.upsert(["a"], np.array([[0, 0, 9]], dtype=np.float32))  # replace in place
    assert idx.query(q, 1)[0][0] == "a"
    np.testing.assert_allclose(idx.vector("a"), [0, 0, 9])
    idx.remove(["a"])
    assert "a" not in idx and len(idx) == 2
    assert [t for t, _ in idx.query(q, 5)] == ["c", "b"]
    assert idx.query(q, 5, exclude=["b", "c"]) == []


@pytest.mark.parametrize("impl", IMPLS)
def test_exclusion_never_returns_fewer_than_n(impl) -> None:
    v = _vectors(2000, 16, seed=1)
    ids = [f"t{i}" for i in range(2000)]
    idx = impl(dim=16)
    idx.upsert(ids, v)
    q = v[0]
    top = [t for t, _ in ExactIndex.query(_exact(ids, v), q, 300)]
    got = idx.query(q, 10, exclude=top[:250])
    assert len(got) == 10 and not set(t for t, _ in got) & set(top[:250])


def _exact(ids: list[str], v: np.ndarray, space: str = "ip") -> ExactIndex:
    e = ExactIndex(v.shape[1], space)  # type: ignore[arg-type]
    e.upsert(ids, v)
    return e


def _recall(idx, ref: ExactIndex, queries: np.ndarray, k: int = 10) -> float:
    hits = 0
    for q in queries:
        truth = {t for t, _ in ref.query(q, k)}
        hits += len(truth & {t for t, _ in idx.query(q, k)})
    return hits / (k * len(queries))


@pytest.mark.parametrize("space", ["ip", "cosine"])
def test_hnsw_recall_after_incremental_updates(space) -> None:
    n, dim = 50_000, 32
    v = _vectors(n, dim, seed=2)
    ids = [f"t{i}" for i in range(n)]
    hnsw = HNSWIndex(dim, space, capacity=n)
    hnsw.upsert(ids, v)
    assert len(hnsw.graphs) == (2 if space == "ip" else 1)  # 50k inner-product tracks: two norm bands
    ref = _exact(ids, v, space)
    rng = np.random.default_rng(3)
    queries = _vectors(200, dim, seed=4)
    assert _recall(hnsw, ref, queries) >= 0.95
    # 10,000 random adds / replaces / deletes, applied to both indexes one by one.
    next_id = n
    for op in rng.integers(0, 3, 10_000):
        if op == 0:
            t, vec = f"t{next_id}", _vectors(1, dim, seed=next_id)
            next_id += 1
        elif op == 1:
            t, vec = f"t{rng.integers(0, next_id)}", _vectors(1, dim, seed=int(rng.integers(1 << 30)))
        else:
            t = f"t{rng.integers(0, next_id)}"
            hnsw.remove([t])
            ref.remove([t])
            continue
        hnsw.upsert([t], vec)
        ref.upsert([t], vec)
    assert len(hnsw) == len(ref)
    assert _recall(hnsw, ref, queries) >= 0.95
