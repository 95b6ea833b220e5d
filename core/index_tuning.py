"""Choose an HNSW index's search breadth (ef) by measuring recall against brute force.

How wide a search must be for a given recall depends on the vectors, not only on their count:
on clustered inner-product data, 200k tracks needed ef≈800 for recall@10 0.96 while 1M tracks
reached 0.98 there. So instead of one fixed ef, a replica takes a sample of the queries it will
serve (user vectors the trainer stores with each model, or the index's own vectors for "similar
tracks"), computes their exact top-n, and takes, per norm band of the index (`core.hnsw`), the
breadths with the least total that reach the target recall.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from core.hnsw import HNSWIndex
from core.index import prep
from core.recommend import top_of_scores

EF_CANDIDATES = (40, 60, 80, 120, 160, 200, 300, 400, 500, 600, 800, 1000, 1200, 1600)


Z_ONE_SIDED_95 = 1.645


@dataclass(frozen=True)
class EfChoice:
    """The chosen ef, the recall@n it measured on `queries` sampled queries, and the one-sided
    95 % lower confidence bound of that recall (what must reach `target`)."""

    ef: int
    recall: float
    queries: int
    target: float
    lower: float = 0.0
    bands: tuple[int, ...] = ()  # ef per norm band, longest first (`core.hnsw`); ef is the widest


def exact_top(
    vectors: np.ndarray, queries: np.ndarray, n: int, exclude: np.ndarray | None = None, chunk: int = 32
) -> np.ndarray:
    """Row i: indices of the n highest inner products of queries[i], leaving out row exclude[i] if given."""
    out = np.empty((len(queries), n), dtype=np.int64)
    for s in range(0, len(queries), chunk):
        scores = queries[s : s + chunk] @ vectors.T  # (chunk, N); chunked to bound memory at 1M tracks
        if exclude is not None:
            scores[np.arange(scores.shape[0]), exclude[s : s + chunk]] = -np.inf
        # set order is all recall needs; on this thread, so that a serve parent can fork after tuning
        out[s : s + chunk] = top_of_scores(scores, n, threads=False)[0]
    return out


def recall_per_query(
    index: HNSWIndex, ids: Sequence[str], queries: np.ndarray, truth: np.ndarray, own: np.ndarray | None = None
) -> np.ndarray:
    """Per query, the share of its exact top-n (row of `truth`) the index returns; own[i], if given, is excluded."""
    n = truth.shape[1]
    out = np.empty(len(queries))
    for i, q in enumerate(queries):
        exclude = [ids[int(own[i])]] if own is not None else []
        got = {t for t, _ in index.query(q, n, exclude=exclude)}
        out[i] = len(got & {ids[int(j)] for j in truth[i]}) / n
    return out


def recall_at(
    index: HNSWIndex, ids: Sequence[str], queries: np.ndarray, truth: np.ndarray, own: np.ndarray | None = None
) -> float:
    """Mean recall@n over the queries (see `recall_per_query`)."""
    return float(recall_per_query(index, ids, queries, truth, own).mean())


def lower_bound(per_query: np.ndarray) -> float:
    """One-sided 95 % lower confidence bound of the mean recall (normal approximation)."""
    if len(per_query) < 2:
        return float(per_query.mean()) if len(per_query) else 0.0
    return float(per_query.mean() - Z_ONE_SIDED_95 * per_query.std(ddof=1) / np.sqrt(len(per_query)))


def band_hits(
    index: HNSWIndex, queries: np.ndarray, truth_labels: np.ndarray, candidates: Sequence[int], own: np.ndarray | None
) -> np.ndarray:
    """hits[b, c, i]: how many of query i's exact top n (labels) band b returns at candidates[c].
    A true top-n track its band returns is in the merged top n, so a query's recall is the sum
    over bands: each band's breadth can be measured on its own."""
    n = truth_labels.shape[1]
    extra = 0 if own is None else 1
    hits = np.zeros((len(index.graphs), len(candidates), len(queries)), dtype=np.int32)
    truth = [set(row) for row in truth_labels.tolist()]
    in_band = index.band_of[truth_labels]
    for b, g in enumerate(index.graphs):
        if index.live[b] == 0:
            continue
        whole = (in_band == b).sum(axis=1)  # the most band b can contribute to each query
        for c, ef in enumerate(candidates):
            g.set_ef(ef)
            found = index.band_knn(b, queries, n + extra).tolist()
            for i, row in enumerate(found):
                if own is not None:
                    row = [lab for lab in row if lab != own[i]]
                hits[b, c, i] = len(truth[i].intersection(row[:n]))
            if (hits[b, c] == whole).all():  # nothing left to find: wider searches find the same
                hits[b, c + 1 :] = hits[b, c]
                break
    return hits


def _cheapest(hits: np.ndarray, candidates: Sequence[int], n: int, target: float) -> tuple[tuple[int, ...], np.ndarray]:
    """The breadth per band (as candidate positions) with the least total breadth whose recall
    lower bound reaches `target`, and its per-query recall; the widest everywhere if none does."""
    cost = [max(ef, n) for ef in candidates]
    best: tuple[int, ...] = tuple([len(candidates) - 1] * hits.shape[0])
    best_cost = float("inf")
    for combo in itertools.product(range(len(candidates)), repeat=hits.shape[0]):
        total = sum(cost[c] for c in combo)
        if total >= best_cost:
            continue
        per_query = sum(hits[b, c] for b, c in enumerate(combo)) / n
        if lower_bound(per_query) >= target:
            best, best_cost = combo, total
    return best, sum(hits[b, c] for b, c in enumerate(best)) / n


def tune_ef(
    index: HNSWIndex,
    ids: Sequence[str],
    vectors: np.ndarray,
    queries: np.ndarray | None = None,
    target: float = 0.95,
    n: int = 10,
    samples: int = 256,
    candidates: Sequence[int] = EF_CANDIDATES,
    seed: int = 0,
) -> EfChoice:
    """Set and return the search breadth, per band, with the least total breadth whose
    recall@n reaches `target` with 95 % confidence: the one-sided lower bound over the sampled
    queries must reach it, so a small or uneven sample asks for a wider search instead of a
    lucky guess. With one band this is the smallest candidate ef that reaches it.

    `queries` should look like what the index will be asked: for personal recommendations,
    a sample of user vectors; all of them are used. Without them, `samples` of the indexed vectors are the queries,
    each excluding its own track (what "similar tracks" asks). If nothing reaches the
    target, the widest is kept. `vectors[i]` must be the vector indexed under `ids[i]`.
    """
    if len(ids) <= n + 1:
        index.set_ef(max(candidates))
        return EfChoice(index.ef, 1.0, 0, target, 1.0, tuple(index.band_ef))
    data = prep(vectors, index.space)
    own: np.ndarray | None = None
    if queries is None or len(queries) == 0:
        own = np.random.default_rng(seed).choice(len(ids), size=min(samples, len(ids)), replace=False)
        q = data[own]
    else:
        q = prep(queries, index.space)
    label_of = np.array([index.slots.label[t] for t in ids], dtype=np.int64)
    truth = label_of[exact_top(data, q, n, own)]
    ordered = sorted(candidates)
    hits = band_hits(index, q, truth, ordered, None if own is None else label_of[own])
    combo, per_query = _cheapest(hits, ordered, n, target)
    index.set_band_ef([ordered[c] for c in combo])
    return EfChoice(index.ef, float(per_query.mean()), len(q), target, lower_bound(per_query), tuple(index.band_ef))
