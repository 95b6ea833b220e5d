"""The catalogue schema, filters, filtered search, explanations and radio, against exact references."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from core.als import ImplicitALS
from core.artists import ArtistSpace, blend, playlist
from core.catalogue import Catalogue, TrackInfo
from core.explain import explain, top_reasons
from core.filters import TrackFilter, pick, search
from core.hnsw import HNSWIndex
from core.index import ExactIndex
from core.messages import MessageError


def entry(track: str, **kw: object) -> bytes:
    return json.dumps({"v": 1, "track_id": track, **kw}).encode()


def test_entries_are_checked_and_removals_are_null_values() -> None:
    track, info = TrackInfo.decode(b"t1", entry("t1", artist_id="a1", tags=["Rock"], regions=["se"], explicit=True))
    assert track == "t1" and info is not None
    assert info.tags == {"rock"} and info.regions == {"SE"} and info.explicit and info.available
    assert TrackInfo.decode(*[info.track_id.encode(), info.encode()])[1] == info  # round trip
    assert TrackInfo.decode(b"t1", None) == ("t1", None)
    for bad, why in [
        (b"{not json", "not JSON"),
        (entry("t2"), "differs from track_id"),
        (entry("t1", explicit="yes"), "explicit must be true or false"),
        (entry("t1", regions=["SWE"]), "two-letter"),
        (entry("t1", tags="rock"), "tags must be a list"),
        (entry("t1", v=2), "schema version"),
        (json.dumps({"v": 1}).encode(), "track_id must be"),
    ]:
        with pytest.raises(MessageError, match=why):
            TrackInfo.decode(b"t1", bad)
    with pytest.raises(MessageError, match="without a key"):
        TrackInfo.decode(None, None)


def _catalogue(n: int, rng: np.random.Generator) -> Catalogue:
    cat = Catalogue()
    for i in range(n):
        cat.put(
            TrackInfo(
                f"t{i}",
                f"a{i % 40}",
                tags=frozenset({"rock"} if i % 10 == 0 else {"pop"}),
                explicit=bool(rng.random() < 0.3),
                regions=None if i % 3 else frozenset({"SE"}),
                available=i % 50 != 7,
            )
        )
    return cat


BANDED = {"split_at": 1000, "head_share": 0.1}  # norm bands (core.hnsw) from 1,000 tracks


def _graph_and_reference(
    rng: np.random.Generator, n_tracks: int, dim: int, ef: int, banded: bool = False
) -> tuple[np.ndarray, HNSWIndex, ExactIndex]:
    """Random track vectors in an HNSW graph and in the exact index that is its reference."""
    V = rng.standard_normal((n_tracks, dim)).astype(np.float32)
    ids = [f"t{i}" for i in range(n_tracks)]
    index = HNSWIndex(dim, "ip", capacity=n_tracks, ef=ef, **(BANDED if banded else {}))  # type: ignore[arg-type]
    index.upsert(ids, V)
    exact = ExactIndex(dim, "ip")
    exact.upsert(ids, V)
    return V, index, exact


def test_pick_applies_every_rule_in_rank_order() -> None:
    cat = _catalogue(200, np.random.default_rng(0))
    ranked = [(f"t{i}", 1.0 - i / 1000) for i in range(200)]
    flt = TrackFilter(
        frozenset({"t0"}), explicit=False, region="US", tags=frozenset({"rock", "jazz"}), max_per_artist=1
    )
    got = pick(ranked, 10, flt, cat)
    for t, _ in got:
        info = cat.get(t)
        assert info is not None and t != "t0" and info.available and not info.explicit and "rock" in info.tags
        assert info.regions is None  # the region-locked ones are SE only
    artists = [cat.artist_of(t) for t, _ in got]
    assert len(set(artists)) == len(artists)
    assert [s for _, s in got] == sorted((s for _, s in got), reverse=True)
    # The exact reference: every track, in order, that passes.
    expected = [t for t, _ in ranked if t != "t0" and flt.admits(cat.get(t))]
    seen: set[str | None] = set()
    capped = []
    for t in expected:
        if cat.artist_of(t) not in seen:
            seen.add(cat.artist_of(t))
            capped.append(t)
    assert [t for t, _ in got] == capped[:10]
    # No catalogue entry: recommendable as before, except where tags are asked for.
    assert pick([("unknown", 1.0)], 1, TrackFilter(explicit=False, region="SE"), cat) == [("unknown", 1.0)]
    assert pick([("unknown", 1.0)], 1, TrackFilter(tags=frozenset({"rock"})), cat) == []


@pytest.mark.parametrize("kind", ["hnsw", "hnsw_bands", "exact"])
def test_filtered_search_fills_n_whenever_n_pass_and_keeps_recall(kind: str) -> None:
    rng = np.random.default_rng(1)
    n_tracks, dim = 3000, 16
    V = rng.standard_normal((n_tracks, dim)).astype(np.float32)
    ids = [f"t{i}" for i in range(n_tracks)]
    bands = BANDED if kind == "hnsw_bands" else {}
    index = HNSWIndex(dim, "ip", capacity=n_tracks, ef=200, **bands) if kind != "exact" else ExactIndex(dim, "ip")  # type: ignore[arg-type]
    index.upsert(ids, V)
    exact = ExactIndex(dim, "ip")
    exact.upsert(ids, V)
    cat = _catalogue(n_tracks, rng)
    rock = TrackFilter(tags=frozenset({"rock"}))  # 10 % pass (minus unavailable)
    rare = TrackFilter(tags=frozenset({"rock"}), region="SE", explicit=False, max_per_artist=1)
    hits = total = 0
    for q in rng.standard_normal((30, dim)).astype(np.float32):
        for flt in (rock, rare):
            got = search(index, q, 10, flt, cat, breadth=200)
            truth = pick(exact.ranked(q, n_tracks), 10, flt, cat)
            assert len(got) == len(truth)  # n whenever n pass (rare: at most one per artist)
            hits += len({t for t, _ in got} & {t for t, _ in truth})
            total += len(truth)
    assert hits / total >= 0.9
    # Fewer pass than asked: all of them, and the search has read the whole index to know it.
    only = TrackFilter(tags=frozenset({"rock"}), region="SE", explicit=False, max_per_artist=1)
    assert len(search(index, V[0], 100, only, cat, 50)) == len(pick(exact.ranked(V[0], n_tracks), 100, only, cat))


def test_explanations_sum_exactly_to_the_exact_score() -> None:
    plays = sp.random(300, 120, density=0.05, random_state=2, format="csr")
    plays.data = np.ceil(plays.data * 6)
    model = ImplicitALS(factors=12, iterations=4, random_state=0).fit(plays)
    Y = model.item_factors_
    row = plays[5]
    x = model.fold_in(row, Y)[0]  # the exact (Cholesky) solve the speed layer starts from
    items = np.array([0, 7, 33, 101])
    scores, contributions = explain(model, Y.T.astype(np.float64) @ Y, Y[row.indices], row.data, Y[items])
    np.testing.assert_allclose(contributions.sum(axis=1), scores, rtol=1e-9)
    np.testing.assert_allclose(scores, Y[items] @ x, rtol=1e-4, atol=1e-6)
    reasons = top_reasons([f"t{j}" for j in row.indices], contributions, keep=2)
    assert all(len(r) == 2 and r[0][1] >= r[1][1] for r in reasons)
    assert explain(model, Y.T @ Y, Y[[]], np.array([]), Y[items])[1].shape == (4, 0)


@settings(max_examples=60, deadline=None)
@given(
    artists=st.lists(st.sampled_from(["a", "b", "c", "d", None]), min_size=1, max_size=40),
    window=st.integers(1, 4),
    n=st.integers(1, 30),
)
def test_radio_never_repeats_an_artist_within_the_window(artists: list[str | None], window: int, n: int) -> None:
    ranked = [(f"t{i}", 1.0 - i / 100) for i in range(len(artists))]
    artist_of = dict(zip((t for t, _ in ranked), artists, strict=True)).get
    out = playlist(ranked, n, window, artist_of)
    assert len({t for t, _ in out}) == len(out) <= n
    seq = [artist_of(t) for t, _ in out]
    for i in range(len(seq)):
        recent = [a for a in seq[max(0, i - window + 1) : i] if a is not None]
        assert seq[i] is None or seq[i] not in recent
    # Greedy: a track is skipped only when its artist blocked it, so with a window of 1 it is the ranking.
    if window == 1:
        assert out == ranked[:n]


def test_related_artists_sit_where_their_tracks_sit() -> None:
    rng = np.random.default_rng(3)
    centers = rng.standard_normal((3, 8)).astype(np.float32)
    tracks, vec = {}, {}
    for a in range(6):  # artists 0,3 near center 0; 1,4 near 1; 2,5 near 2
        tracks[f"a{a}"] = [f"a{a}t{j}" for j in range(4)]
        for t in tracks[f"a{a}"]:
            vec[t] = centers[a % 3] + 0.1 * rng.standard_normal(8).astype(np.float32)
    space = ArtistSpace(tracks, lambda ts: np.stack([vec[t] for t in ts]), lambda t: 1.0)
    assert space.similar("a0", 1)[0][0] == "a3" and space.similar("a4", 1)[0][0] == "a1"
    assert "a0" not in {a for a, _ in space.similar("a0", 5)}
    q = blend(space.vector("a2"), centers[0], 0.0)  # no listener pull: the seed alone
    np.testing.assert_allclose(q, space.vector("a2"), rtol=1e-5)


def test_a_narrow_filter_is_answered_exactly_and_a_stale_plan_never_returns_what_stopped_passing() -> None:
    from core.filter_plans import FilterPlans, planned_search

    rng = np.random.default_rng(4)
    n_tracks, dim = 4000, 16
    V, index, exact = _graph_and_reference(rng, n_tracks, dim, ef=50)
    cat = _catalogue(n_tracks, rng)
    plans = FilterPlans(max_rows=1000, max_age_s=3600)
    rock = TrackFilter(tags=frozenset({"rock"}), max_per_artist=2)  # ~400 pass: the exact plan
    assert plans.subset(index, rock, cat) is not None
    assert plans.subset(index, TrackFilter(explicit=False), cat) is None  # ~2,800 pass: the graph
    for q in rng.standard_normal((20, dim)).astype(np.float32):
        got = planned_search(index, q, 10, rock, cat, plans)
        assert got == pick(exact.ranked(q, n_tracks), 10, rock, cat)  # exact: same tracks, same order
    # Taken down after the plan was built (and within its age): never returned.
    q = V[0]
    first = planned_search(index, q, 10, rock, cat, plans)[0][0]
    info = cat.get(first)
    assert info is not None
    cat.put(info.with_available(False))
    assert first not in {t for t, _ in planned_search(index, q, 10, rock, cat, plans)}
    # Still the exact answer over what passes now (rock tracks have 4 artists: the cap leaves 8).
    assert planned_search(index, q, 10, rock, cat, plans) == pick(exact.ranked(q, n_tracks), 10, rock, cat)


@pytest.mark.parametrize("banded", [False, True])
def test_a_middling_filter_too_large_to_scan_uses_the_graphs_filter_callback(banded: bool) -> None:
    from core.filter_plans import FilterPlans, planned_search

    rng = np.random.default_rng(6)
    n_tracks, dim = 4000, 16
    V, index, exact = _graph_and_reference(rng, n_tracks, dim, ef=100, banded=banded)
    assert len(index.graphs) == (2 if banded else 1)
    cat = _catalogue(n_tracks, rng)
    plans = FilterPlans(max_rows=100)  # rock passes ~400: more than max_rows, under max_share
    rock = TrackFilter(tags=frozenset({"rock"}), exclude=frozenset({"t10", "t20"}))
    subset = plans.subset(index, rock, cat)
    assert subset is not None and subset.vectors is None and subset.mask is not None
    hits = 0
    for q in rng.standard_normal((20, dim)).astype(np.float32):
        got = planned_search(index, q, 10, rock, cat, plans)
        truth = pick(exact.ranked(q, n_tracks), 10, rock, cat)
        assert len(got) == 10 and all(rock.admits(cat.get(t)) and t not in rock.exclude for t, _ in got)
        hits += len({t for t, _ in got} & {t for t, _ in truth})
    assert hits / 200 >= 0.9
