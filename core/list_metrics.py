"""Beyond accuracy: what the top-k lists of an evaluation look like, not only whether they hit.

A model can gain precision by recommending the same hits to everyone; these measures show it.
All are computed on the evaluation's own lists (`Metrics.top`), so they cost one pass over
at most a few thousand lists.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def listeners_share(plays: sp.spmatrix) -> np.ndarray:
    """Per track, the share of users who played it (the popularity these measures refer to)."""
    m = sp.csc_matrix(plays)
    return np.diff(m.indptr).astype(np.float64) / max(m.shape[0], 1)


def beyond_accuracy(
    top: np.ndarray,
    plays: sp.spmatrix,
    truth: sp.spmatrix | None = None,
    artist_of: dict[int, str] | None = None,
) -> dict[str, float]:
    """Coverage, novelty, popularity bias and diversity of the lists in `top` (rows of track
    indices, -1 = empty slot).

    - `coverage@k`: share of the tracks with plays that appear in at least one list;
    - `novelty@k`: mean self-information −log2(share of users who played it) of a listed track;
    - `popularity_lift@k`: mean listener share of listed tracks over that of the held-out
      tracks in `truth` (1 = as popular as what users went on to play; above 1, biased to hits);
    - `diversity@k`: mean pairwise (1 − cosine) of listed tracks' listener columns, a measure
      independent of the model's own factors so that models of any size compare;
    - `artist_diversity@k` (with `artist_of`): mean share of distinct artists in a list.
    """
    k = top.shape[1]
    share = listeners_share(plays)
    listed = top[top >= 0]
    out: dict[str, float] = {}
    played = np.count_nonzero(share)
    out[f"coverage@{k}"] = float(np.unique(listed).size / played) if played else 0.0
    with np.errstate(divide="ignore"):
        info = -np.log2(share[listed])
    out[f"novelty@{k}"] = float(np.mean(info[np.isfinite(info)])) if listed.size else 0.0
    if truth is not None and sp.csr_matrix(truth).nnz and listed.size:
        held = sp.csr_matrix(truth).indices
        out[f"popularity_lift@{k}"] = float(share[listed].mean() / max(share[held].mean(), 1e-12))
    out[f"diversity@{k}"] = _column_diversity(top, plays)
    if artist_of is not None:
        shares = []
        for row in top:
            named = [artist_of[t] for t in row if t >= 0 and t in artist_of]
            if len(named) >= 2:
                shares.append(len(set(named)) / len(named))
        if shares:
            out[f"artist_diversity@{k}"] = float(np.mean(shares))
    return out


def _column_diversity(top: np.ndarray, plays: sp.spmatrix) -> float:
    """Mean over lists of the mean pairwise (1 − cosine) of the listed tracks' play columns."""
    cols = sp.csc_matrix(plays, dtype=np.float64)
    norms = np.sqrt(np.asarray(cols.multiply(cols).sum(axis=0)).ravel())
    unit = cols @ sp.diags(1.0 / np.where(norms > 0, norms, 1.0))
    unit = sp.csc_matrix(unit)
    values = []
    for row in top:
        items = row[row >= 0]
        if items.size < 2:
            continue
        sub = unit[:, items]
        cos = (sub.T @ sub).toarray()
        n = items.size
        values.append(1.0 - (cos.sum() - np.trace(cos)) / (n * (n - 1)))
    return float(np.mean(values)) if values else 0.0
