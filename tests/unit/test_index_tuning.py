"""ef chosen by measured recall: reaches the target, is the smallest candidate that does, generalises."""

from __future__ import annotations

import numpy as np
import pytest

from core.hnsw import HNSWIndex
from core.index import ExactIndex
from core.index_tuning import EF_CANDIDATES, exact_top, lower_bound, recall_at, recall_per_query, tune_ef
from tests.unit.test_index_contract import _exact, _recall, _vectors

pytestmark = pytest.mark.unit


def test_exact_top_matches_reference_and_excludes_own_row() -> None:
    v = _vectors(3000, 16, seed=5)
    ids = [f"t{i}" for i in range(len(v))]
    ref = _exact(ids, v)
    rows = np.array([0, 17, 2999])
    top = exact_top(v, v[rows], 10, rows, chunk=2)
    for i, r in enumerate(rows):
        want = {t for t, _ in ExactIndex.query(ref, v[r], 10, exclude=[ids[r]])}
        assert {ids[j] for j in top[i]} == want
        assert r not in top[i]


def _hnsw(space: str, n: int = 20_000, dim: int = 32) -> tuple[HNSWIndex, list[str], np.ndarray]:
    v = _vectors(n, dim, seed=6)
    ids = [f"t{i}" for i in range(n)]
    idx = HNSWIndex(dim, space, capacity=n)  # type: ignore[arg-type]
    idx.upsert(ids, v)
    return idx, ids, v


def test_tuned_ef_on_user_like_queries_is_smallest_and_generalises() -> None:
    idx, ids, v = _hnsw("ip")
    users = _vectors(400, 32, seed=7)  # another set of centres: queries that sit between track clusters
    choice = tune_ef(idx, ids, v, queries=users[:200], target=0.96)
    assert choice.recall > choice.lower >= 0.96 and idx.ef == choice.ef and choice.queries == 200
    lower = [c for c in EF_CANDIDATES if c < choice.ef]
    assert lower, "data chosen so that the narrowest candidate is not enough"
    truth = exact_top(v, users[:200], 10)
    idx.set_ef(lower[-1])
    assert lower_bound(recall_per_query(idx, ids, users[:200], truth)) < 0.96  # the next narrower one misses
    idx.set_ef(choice.ef)
    assert _recall(idx, _exact(ids, v), users[200:]) >= 0.94  # held-out queries of the same kind


def test_tuned_ef_for_similar_tracks_uses_index_rows() -> None:
    idx, ids, v = _hnsw("cosine")
    choice = tune_ef(idx, ids, v, target=0.96, samples=300)
    assert choice.lower >= 0.96 and choice.queries == 300
    rows = np.random.default_rng(1).choice(len(ids), 200, replace=False)  # other rows than the sample
    unit = v / np.linalg.norm(v, axis=1, keepdims=True)
    assert recall_at(idx, ids, unit[rows], exact_top(unit, unit[rows], 10, rows), rows) >= 0.94


def test_user_like_queries_need_a_wider_search_than_index_rows() -> None:
    """Why the trainer ships a sample of user vectors: tuning on tracks alone would under-shoot."""
    idx, ids, v = _hnsw("ip")
    on_rows = tune_ef(idx, ids, v, target=0.96).ef
    on_users = tune_ef(idx, ids, v, queries=_vectors(200, 32, seed=7), target=0.96).ef
    assert on_users > on_rows


def test_lower_bound_widens_with_spread_and_narrows_with_more_queries() -> None:
    even = np.full(100, 0.96)
    assert lower_bound(even) == pytest.approx(0.96)  # no spread: no margin
    uneven = np.array([1.0, 0.9] * 50)  # spread 0.05 over 100 queries: a margin of about 1.645 × 0.005
    assert uneven.mean() - 0.01 < lower_bound(uneven) < uneven.mean() - 0.007
    assert lower_bound(np.tile(uneven, 10)) > lower_bound(uneven)  # ten times the sample: a tighter bound


def test_tiny_index_keeps_widest_search() -> None:
    idx = HNSWIndex(4, "ip")
    idx.upsert(["a", "b"], np.eye(2, 4, dtype=np.float32))
    assert tune_ef(idx, ["a", "b"], np.eye(2, 4, dtype=np.float32)).ef == max(EF_CANDIDATES)
