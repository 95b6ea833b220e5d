"""The head band's exact scan: the true top k of its live vectors, through updates, filters and
snapshots, and what tuning makes of a band that is exact."""

from __future__ import annotations

import numpy as np
import pytest

from core.exact_band import ExactBand
from core.hnsw import HNSWIndex
from core.index_tuning import tune_ef
from tests.unit.test_index_contract import _vectors

pytestmark = pytest.mark.unit


def _truth(rows: dict[int, np.ndarray], q: np.ndarray, k: int) -> list[list[int]]:
    labels = np.array(sorted(rows))
    scores = np.stack([rows[lab] for lab in labels]) @ q.T
    return [labels[np.argsort(-scores[:, a], kind="stable")[:k]].tolist() for a in range(len(q))]


def test_the_scan_returns_the_true_top_k_through_adds_removals_and_compactions() -> None:
    rng = np.random.default_rng(4)
    band, kept = ExactBand(8, capacity=16), {}
    q = rng.standard_normal((5, 8)).astype(np.float32)
    next_label = 0
    for step in range(30):  # rows come and go: the dense copy compacts and grows on the way
        new = rng.standard_normal((20, 8)).astype(np.float32)
        labels = np.arange(next_label, next_label + 20)
        next_label += 20
        band.add(labels, new)
        kept.update(zip(labels.tolist(), new, strict=True))
        for lab in rng.choice(sorted(kept), size=12, replace=False).tolist():
            band.remove(lab)
            del kept[lab]
        got, dist = band.knn(q, 7)
        assert got.dtype == np.uint64 and len(band) == len(kept)
        assert got.tolist() == _truth(kept, q, 7), f"step {step}"
        np.testing.assert_allclose(dist[0], 1 - q[0] @ np.stack([kept[lab] for lab in got[0].tolist()]).T, atol=1e-5)
    with pytest.raises(RuntimeError):
        band.knn(q, len(kept) + 1)


def test_a_filtered_scan_keeps_the_best_that_pass_and_refuses_when_too_few_do() -> None:
    rng = np.random.default_rng(5)
    band = ExactBand(8)
    v = rng.standard_normal((200, 8)).astype(np.float32)
    band.add(np.arange(200), v)
    band.remove(3)
    q = rng.standard_normal((3, 8)).astype(np.float32)
    even = {lab: v[lab] for lab in range(0, 200, 2) if lab != 3}
    got, _ = band.knn(q, 9, lambda lab: lab % 2 == 0)
    assert got.tolist() == _truth(even, q, 9)
    with pytest.raises(RuntimeError):
        band.knn(q, 9, lambda lab: lab < 5)


def _banded(exact_max: int) -> tuple[HNSWIndex, list[str], np.ndarray]:
    v = _vectors(3000, 16, seed=11)
    ids = [f"t{i}" for i in range(len(v))]
    idx = HNSWIndex(16, "ip", capacity=len(v), split_at=1000, head_share=0.1, exact_max=exact_max)
    idx.upsert(ids, v)
    return idx, ids, v


def test_a_small_head_band_is_searched_exactly_and_a_large_one_by_its_graph(tmp_path) -> None:
    idx, ids, v = _banded(exact_max=1000)
    assert idx.exact is not None and len(idx.exact) == idx.live[0] == 300
    idx.set_band_ef([40, 40])  # the head's graph at ef 40 would miss some; the scan cannot
    q = _vectors(20, 16, seed=3)
    head = {idx.slots.label[t]: v[i] for i, t in enumerate(ids) if idx.band_of[idx.slots.label[t]] == 0}
    assert idx.band_knn(0, q, 10).tolist() == _truth(head, q, 10)
    idx.upsert([ids[0]], 5 * v[np.argmax(np.linalg.norm(v, axis=1))][None])  # now the longest: in the head
    idx.remove([t for t in ids[1:50] if idx.band_of[idx.slots.label[t]] == 0])
    head = {idx.slots.label[t]: idx.vector(t) for t in idx.slots.label if idx.band_of[idx.slots.label[t]] == 0}
    assert len(idx.exact) == idx.live[0] and idx.band_knn(0, q, 10).tolist() == _truth(head, q, 10)
    idx.save(tmp_path / "g.bin")
    back = HNSWIndex.load(tmp_path / "g.bin")
    back.set_band_ef([40, 40])
    assert back.exact is not None and [back.query(x, 10) for x in q] == [idx.query(x, 10) for x in q]
    large, _, _ = _banded(exact_max=299)
    assert large.exact is None


def test_tuning_with_an_exact_head_gives_the_tail_only_the_breadth_it_needs() -> None:
    v = _vectors(20_000, 32, seed=2)
    ids = [f"t{i}" for i in range(len(v))]
    users = _vectors(300, 32, seed=7)
    choices = {}
    for exact_max in (0, 10_000):
        idx = HNSWIndex(32, "ip", capacity=len(v), split_at=1000, head_share=0.05, exact_max=exact_max)
        idx.upsert(ids, v)
        choices[exact_max] = tune_ef(idx, ids, v, queries=users[:200], target=0.95)
        assert choices[exact_max].lower >= 0.95
    assert choices[10_000].bands[0] == 40  # any breadth finds the head's whole share: the cheapest
    assert choices[10_000].bands[1] <= choices[0].bands[1]
