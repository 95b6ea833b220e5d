"""Why a track was recommended: each played track's exact share of the score (as implicit's
`explain` computes it).

Implicit ALS solves a listener's vector x = A⁻¹ b with A = YᵀY + λI + Σⱼ (cⱼ − 1) yⱼyⱼᵀ and
b = Σⱼ cⱼ yⱼ over the played tracks j (confidence cⱼ). A track i then scores
yᵢᵀx = Σⱼ cⱼ · yᵢᵀA⁻¹yⱼ: a sum with one term per played track. Those terms are the
contributions; they sum exactly to the score of the exactly solved vector (Cholesky, float64).
The served vector comes from the speed layer's warm-started fold-in, so the served score
matches that sum up to the solver's tolerance.
"""

from __future__ import annotations

import numpy as np

from core.als import ImplicitALS


def explain(
    model: ImplicitALS, gram: np.ndarray, played: np.ndarray, plays: np.ndarray, items: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, contributions): contributions[r, j] is played track j's part in the score of
    item r; scores[r] = contributions[r].sum() = yᵢᵀx of the exact solve.

    `played` holds the played tracks' factors (rows), `plays` their raw play weights, `items`
    the recommended tracks' factors, `gram` YᵀY of all the model's tracks (without λ).
    """
    Yp = np.asarray(played, dtype=np.float64)
    Yi = np.asarray(items, dtype=np.float64)
    if len(Yp) == 0:
        return np.zeros(len(Yi)), np.zeros((len(Yi), 0))
    k = Yp.shape[1]
    conf = model.confidence_of(np.asarray(plays, dtype=np.float32)).astype(np.float64)
    A = np.asarray(gram, dtype=np.float64) + model.regularization * np.eye(k) + (Yp.T * (conf - 1.0)) @ Yp
    L = np.linalg.cholesky(A)
    # A⁻¹ yᵢ for each recommended item, by two triangular solves.
    Z = np.linalg.solve(L.T, np.linalg.solve(L, Yi.T))
    contributions = (Yp @ Z).T * conf  # items × played
    return contributions.sum(axis=1), contributions


def top_reasons(played_ids: list[str], contributions: np.ndarray, keep: int = 3) -> list[list[tuple[str, float]]]:
    """Per item, the `keep` played tracks with the largest contributions, largest first."""
    out = []
    for row in contributions:
        order = np.argsort(-row, kind="stable")[:keep]
        out.append([(played_ids[j], float(row[j])) for j in order])
    return out
