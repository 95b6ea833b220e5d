"""Offline evaluation: holdout splits and ranking metrics (precision, MAP, NDCG, AUC, EPR)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from core.recommend import masked_scores, top_of_scores

SCORES_PER_BATCH = 64_000_000  # users × tracks scored at once (float32: 256 MB)


def holdout_split(
    plays: sp.spmatrix, fraction: float = 0.2, min_plays: int = 3, seed: int = 0
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Per user, hold out a random `fraction` of played tracks (users with ≥ min_plays tracks)."""
    m = sp.csr_matrix(plays, dtype=np.float32)
    m.sum_duplicates()
    rng = np.random.default_rng(seed)
    coo = m.tocoo()
    per_user = np.diff(m.indptr)
    eligible = per_user[coo.row] >= min_plays
    test_mask = eligible & (rng.random(coo.nnz) < fraction)
    shape = m.shape

    def part(mask: np.ndarray) -> sp.csr_matrix:
        return sp.csr_matrix((coo.data[mask], (coo.row[mask], coo.col[mask])), shape=shape)

    return part(~test_mask), part(test_mask)


def sample_holdout(
    plays: sp.spmatrix, users: int, fraction: float = 0.2, min_plays: int = 3, seed: int = 0
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Hold out a `fraction` of the tracks (at least one) of `users` sampled users only.

    Every other user keeps all their plays for training, so the model loses only the held-out
    plays of the sample; a per-user split over everyone would cost each user a tenth of theirs.
    """
    m = sp.csr_matrix(plays, dtype=np.float32)
    m.sum_duplicates()
    per_user = np.diff(m.indptr)
    eligible = np.flatnonzero(per_user >= min_plays)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(eligible, size=min(users, eligible.size), replace=False) if eligible.size else eligible
    test_mask = np.zeros(m.nnz, dtype=bool)
    for u in chosen:
        lo, hi = m.indptr[u], m.indptr[u + 1]
        take = max(1, int(round(fraction * (hi - lo))))
        test_mask[lo + rng.choice(hi - lo, size=take, replace=False)] = True
    return _csr_part(m, ~test_mask), _csr_part(m, test_mask)


def _csr_part(m: sp.csr_matrix, keep: np.ndarray) -> sp.csr_matrix:
    """The entries of `m` where `keep`, still sorted CSR; no COO copy of the whole matrix
    (at 100M plays the COO route was the holdout's memory peak)."""
    kept_before = np.zeros(m.nnz + 1, dtype=m.indptr.dtype)  # kept entries before each position
    np.cumsum(keep, out=kept_before[1:])
    indptr = kept_before[m.indptr]
    return sp.csr_matrix((m.data[keep], m.indices[keep], indptr), shape=m.shape)


def time_split(
    user: np.ndarray,
    item: np.ndarray,
    ts: np.ndarray,
    weight: np.ndarray,
    cutoff: float,
    shape: tuple[int, int],
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Plays before `cutoff` train, plays after test (tracks already in train dropped from test)."""
    before = ts < cutoff
    train = sp.csr_matrix((weight[before], (user[before], item[before])), shape=shape)
    test = sp.csr_matrix((weight[~before], (user[~before], item[~before])), shape=shape)
    train.sum_duplicates()
    test.sum_duplicates()
    test = test - test.multiply(train > 0)
    test.eliminate_zeros()
    return train.tocsr(), sp.csr_matrix(test)


@dataclass(frozen=True)
class Metrics:
    """Ranking quality on held-out plays; higher is better except `epr` (lower is better)."""

    precision: float
    map: float
    ndcg: float
    auc: float
    epr: float
    users: int
    top: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64), repr=False, compare=False)
    top_users: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False, compare=False)

    def as_dict(self, k: int) -> dict[str, float]:
        return {
            f"precision@{k}": self.precision,
            f"map@{k}": self.map,
            f"ndcg@{k}": self.ndcg,
            "auc": self.auc,
            "expected_percentile_rank": self.epr,
            "eval_users": self.users,
        }


def ranking_metrics(
    user_factors: np.ndarray,
    item_factors: np.ndarray,
    train: sp.spmatrix,
    test: sp.spmatrix,
    k: int = 10,
    max_users: int | None = 5000,
    seed: int = 0,
) -> Metrics:
    """Metrics@k over users with held-out plays; train tracks are excluded from rankings.

    The top-k lists are kept (`top`, rows of `top_users`) for the beyond-accuracy measures.

    Precision@k divides by min(k, |test|) as implicit's `precision_at_k` does, so that
    figures compare across libraries.
    """
    train, test = sp.csr_matrix(train), sp.csr_matrix(test)
    users = np.flatnonzero(np.diff(test.indptr) > 0)
    if max_users is not None and users.size > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    if users.size == 0:
        raise ValueError("no user has held-out plays")
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    prec, ap, ndcg, auc, epr_num, epr_den = [], [], [], [], 0.0, 0.0
    n_items = item_factors.shape[0]
    tops = np.full((users.size, k), -1, dtype=np.int64)  # -1: no track in that slot
    step = int(np.clip(SCORES_PER_BATCH // max(n_items, 1), 16, 256))  # ≤ 256 MB of scores at 1M tracks
    for s in range(0, users.size, step):
        batch = users[s : s + step]
        tr, te = train[batch], test[batch]
        scores = masked_scores(user_factors[batch], item_factors, tr)  # one matmul serves every metric
        idx, _ = top_of_scores(scores, k)
        tops[s : s + batch.size, : idx.shape[1]] = idx
        for r in range(batch.size):
            truth = te.indices[te.indptr[r] : te.indptr[r + 1]]
            weights = te.data[te.indptr[r] : te.indptr[r + 1]]
            hits = np.isin(idx[r], truth)
            denom = min(k, truth.size)
            prec.append(hits.sum() / denom)
            cum = np.cumsum(hits) / np.arange(1, k + 1)
            ap.append(float((cum * hits).sum()) / denom)
            ndcg.append(float((hits * discount).sum()) / float(discount[:denom].sum()))
            row = scores[r]  # train tracks are -inf: never counted as ranked above a held-out one
            seen_size = tr.indptr[r + 1] - tr.indptr[r]
            candidates = n_items - seen_size
            # Tracks ranked above each held-out one: a count per held-out track (no sort of the row).
            higher = np.count_nonzero(row[None, :] > row[truth][:, None], axis=1)
            # Percentile rank: 0 = top of the list, 1 = bottom.
            pr = higher / max(candidates - 1, 1)
            epr_num += float((weights * pr).sum())
            epr_den += float(weights.sum())
            negatives = candidates - truth.size
            if negatives > 0:
                auc.append(float(np.mean(1.0 - (higher / negatives).clip(0, 1))))
    return Metrics(
        float(np.mean(prec)),
        float(np.mean(ap)),
        float(np.mean(ndcg)),
        float(np.mean(auc)) if auc else float("nan"),
        epr_num / epr_den,
        int(users.size),
        tops,
        users,
    )
