"""Choose an HNSW index's search breadth (ef) by measuring recall against brute force.

How wide a search must be for a given recall depends on the vectors, not only on their count:
on clustered inner-product data, 200k tracks needed ef≈800 for recall@10 0.96 while 1M tracks
reached 0.98 there. So instead of one fixed ef, a replica takes a sample of the queries it will
serve (user vectors the trainer stores with each model, or the index's own vectors for "similar
tracks"), computes their exact top-n, and takes the smallest ef that reaches the target recall.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from core.index import HNSWIndex, _prep
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
    """Set and return the smallest candidate ef whose recall@n reaches `target` with 95 %
    confidence: the one-sided lower bound over the sampled queries must reach it, so a small
    or uneven sample asks for a wider search instead of a lucky guess.

    `queries` should look like what the index will be asked: for personal recommendations,
    a sample of user vectors; all of them are used. Without them, `samples` of the indexed vectors are the queries,
    each excluding its own track (what "similar tracks" asks). If no candidate reaches the
    target, the widest is kept. `vectors[i]` must be the vector indexed under `ids[i]`.
    """
    if len(ids) <= n + 1:
        index.set_ef(max(candidates))
        return EfChoice(index.ef, 1.0, 0, target, 1.0)
    data = _prep(vectors, index.space)
    own: np.ndarray | None = None
    if queries is None or len(queries) == 0:
        own = np.random.default_rng(seed).choice(len(ids), size=min(samples, len(ids)), replace=False)
        q = data[own]
    else:
        q = _prep(queries, index.space)
    truth = exact_top(data, q, n, own)
    chosen = EfChoice(max(candidates), 0.0, len(q), target)
    for ef in sorted(candidates):
        index.set_ef(ef)
        per_query = recall_per_query(index, ids, q, truth, own)
        chosen = EfChoice(ef, float(per_query.mean()), len(q), target, lower_bound(per_query))
        if chosen.lower >= target:
            break
    return chosen
