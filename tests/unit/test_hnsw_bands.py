"""Norm bands of an inner-product HNSW index: placement, moves, snapshots, and per-band tuning."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core.hnsw import HNSWIndex
from core.index_tuning import recall_per_query, tune_ef
from tests.unit.test_index_contract import _vectors

pytestmark = pytest.mark.unit


def _banded(n: int = 3000, dim: int = 16, space: str = "ip") -> tuple[HNSWIndex, list[str], np.ndarray]:
    v = _vectors(n, dim, seed=11)
    ids = [f"t{i}" for i in range(n)]
    idx = HNSWIndex(dim, space, capacity=n, split_at=1000, head_share=0.1)  # type: ignore[arg-type]
    idx.upsert(ids, v)
    return idx, ids, v


def test_a_large_inner_product_index_keeps_its_longest_tenth_apart_and_cosine_does_not() -> None:
    idx, ids, v = _banded()
    norms = np.linalg.norm(v, axis=1)
    head = {ids[i] for i in np.flatnonzero(norms >= idx.cuts[0])}  # type: ignore[index]
    assert len(idx.graphs) == 2 and idx.live == [len(head), len(ids) - len(head)]
    assert abs(len(head) - 300) <= 1
    assert {t for t in ids if idx.band_of[idx.slots.label[t]] == 0} == head
    cos, _, _ = _banded(space="cosine")
    assert len(cos.graphs) == 1 and cos.cuts == []
    small = HNSWIndex(16, "ip", split_at=1000)
    small.upsert(ids[:999], v[:999])
    assert len(small.graphs) == 1


def test_a_track_whose_norm_changes_moves_band_and_is_found_there() -> None:
    idx, ids, v = _banded()
    t = next(t for t in ids if idx.band_of[idx.slots.label[t]] == 1)
    longest = v[np.argmax(np.linalg.norm(v, axis=1))]
    head, tail = idx.live
    idx.upsert([t], 3 * longest)
    assert idx.band_of[idx.slots.label[t]] == 0 and idx.live == [head + 1, tail - 1]
    assert idx.query(longest, 1)[0][0] == t
    np.testing.assert_allclose(idx.vector(t), 3 * longest, rtol=1e-6)
    idx.remove([t])
    assert t not in idx and sum(idx.live) == len(ids) - 1
    assert t not in {x for x, _ in idx.query(longest, 50)}


def test_bands_survive_a_snapshot_and_an_old_one_graph_snapshot_still_loads(tmp_path) -> None:
    idx, ids, v = _banded()
    idx.set_band_ef([120, 40])
    q = _vectors(20, 16, seed=3)
    idx.save(tmp_path / "g.bin")
    back = HNSWIndex.load(tmp_path / "g.bin", ef=90)
    assert back.cuts == idx.cuts and back.live == idx.live and back.band_ef == [90, 90]
    back.set_band_ef([120, 40])
    assert [back.query(x, 10) for x in q] == [idx.query(x, 10) for x in q]
    np.testing.assert_array_equal(back.stored(ids[:50]), idx.stored(ids[:50]))

    one = HNSWIndex(16, "ip")  # a snapshot from before bands: no cuts or band_of in its id map
    one.upsert(ids, v)
    one.save(tmp_path / "old.bin")
    meta_path = tmp_path / "old.bin.ids.json"
    meta = json.loads(meta_path.read_text())
    del meta["cuts"], meta["band_of"]
    meta_path.write_text(json.dumps(meta))
    old = HNSWIndex.load(tmp_path / "old.bin")
    assert len(old.graphs) == 1 and [old.query(x, 5) for x in q] == [one.query(x, 5) for x in q]


def test_tuned_band_breadths_give_the_recall_the_queries_then_get() -> None:
    idx, ids, v = _banded(n=20_000, dim=32)
    users = _vectors(300, 32, seed=7)
    choice = tune_ef(idx, ids, v, queries=users[:200], target=0.95)
    assert choice.lower >= 0.95 and len(choice.bands) == 2 and list(choice.bands) == idx.band_ef
    # the per-band measurement is exact: the merged search gives each query that recall
    row = {t: i for i, t in enumerate(ids)}
    truth = np.array([[row[t] for t, _ in _exact_top(v, ids, u)] for u in users[:200]])
    measured = recall_per_query(idx, ids, users[:200], truth)
    assert measured.mean() == pytest.approx(choice.recall, abs=1e-9)


def _exact_top(v: np.ndarray, ids: list[str], q: np.ndarray, n: int = 10) -> list[tuple[str, float]]:
    s = v @ q
    return [(ids[i], float(s[i])) for i in np.argsort(-s)[:n]]
