"""What Encore serves, by the trainer's own procedure, against a grid-tuned `implicit`.

    python -m bench.quality [--users 50000 --tracks 10000] [--plays FILE.csv] [--budget 120]

An outer holdout (20 % of each user's tracks) is hidden from every contender; each contender
trains on the rest as it would in production and is scored on the outer plays (precision@10,
NDCG@10, coverage, novelty, diversity). Contenders:

- `encore_before`: the trainer before issue 17 (10 % of every user's tracks held out, track
  factors published without them, users folded in on all plays), settings' defaults;
- `encore_untuned`: today's trainer with ENCORE_TUNE=false (sampled holdout + warm refit);
- `encore_default`: today's trainer with its defaults (tuning on, ENCORE_TUNE_BUDGET_S);
- `full_fit`: the settings' defaults fit once on all plays (what no holdout at all would give);
- `implicit_grid`: implicit's ALS tuned over a 27-point grid (factors × regularization × α)
  on its own validation split, refit on all plays with the winner.

`--plays` takes a CSV of user,track,count (a header line is skipped) instead of synthetic data.
Writes bench/results/quality.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # implicit parallelises itself

import argparse  # noqa: E402
import csv  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402

from bench.common import write  # noqa: E402
from core.als import ImplicitALS  # noqa: E402
from core.evaluation import holdout_split, ranking_metrics  # noqa: E402
from core.list_metrics import beyond_accuracy  # noqa: E402
from core.synthetic import SyntheticMusic  # noqa: E402
from services.batch.engines import LocalEngine, model_for  # noqa: E402
from services.batch.model_search import ModelSearch  # noqa: E402
from services.infra.settings import Settings  # noqa: E402

GRID = [(f, r, a) for f in (32, 64, 128) for r in (0.01, 0.1, 1.0) for a in (1.0, 10.0, 40.0)]


def load_csv(path: str) -> sp.csr_matrix:
    users: dict[str, int] = {}
    tracks: dict[str, int] = {}
    rows, cols, vals = [], [], []
    with open(path, newline="") as f:
        for rec in csv.reader(f):
            if len(rec) < 3:
                continue
            try:
                count = float(rec[2])
            except ValueError:
                continue  # a header line
            rows.append(users.setdefault(rec[0], len(users)))
            cols.append(tracks.setdefault(rec[1], len(tracks)))
            vals.append(count)
    m = sp.csr_matrix((vals, (rows, cols)), shape=(len(users), len(tracks)), dtype=np.float32)
    m.sum_duplicates()
    return m


def served(name: str, U: np.ndarray, V: np.ndarray, seen: sp.csr_matrix, outer: sp.csr_matrix, secs: float) -> dict:
    m = ranking_metrics(U, V, seen, outer, k=10, max_users=5000, seed=1)
    row = {"precision@10": m.precision, "ndcg@10": m.ndcg, "seconds": round(secs, 2)}
    row.update(beyond_accuracy(m.top, seen, outer))
    print(
        f"  {name:16s} precision@10 {m.precision:.4f} ndcg@10 {m.ndcg:.4f} coverage {row['coverage@10']:.3f} "
        f"({secs:.1f}s)",
        flush=True,
    )
    return row


def encore_before(s: Settings, inner: sp.csr_matrix) -> ImplicitALS:
    train, _test = holdout_split(inner, fraction=0.1, seed=0)
    model = LocalEngine(s).fit(train)
    model.user_factors_ = model.fold_in(inner, model.item_factors_, start=model.user_factors_)
    return model


def implicit_grid(inner: sp.csr_matrix, iterations: int) -> tuple[Any, dict[str, Any]]:
    from implicit.cpu.als import AlternatingLeastSquares

    def fit(p: tuple[float, float, float], m: sp.csr_matrix) -> Any:
        f, r, a = p
        model = AlternatingLeastSquares(
            factors=int(f),
            regularization=r,
            alpha=a,
            iterations=iterations,
            calculate_training_loss=False,
            random_state=0,
        )
        model.fit(m, show_progress=False)
        return model

    train, val = holdout_split(inner, fraction=0.1, seed=2)
    scores = []
    for p in GRID:
        m = fit(p, train)
        scores.append(ranking_metrics(m.user_factors, m.item_factors, train, val, max_users=5000).precision)
    best = GRID[int(np.argmax(scores))]
    grid = [
        {"factors": f, "regularization": r, "alpha": a, "validation_precision@10": s}
        for (f, r, a), s in zip(GRID, scores, strict=True)
    ]
    return fit(best, inner), {
        "winner": dict(zip(("factors", "regularization", "alpha"), best, strict=True)),
        "grid": grid,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=50_000)
    ap.add_argument("--tracks", type=int, default=10_000)
    ap.add_argument("--plays", help="CSV of user,track,count instead of synthetic data")
    ap.add_argument("--budget", type=float, default=Settings().tune_budget_s)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="quality")
    args = ap.parse_args()
    if args.plays:
        plays, source = load_csv(args.plays), args.plays
    else:
        data = SyntheticMusic(
            n_users=args.users,
            n_tracks=args.tracks,
            mean_plays=40,
            n_genres=max(20, args.tracks // 100),
            seed=args.seed,
        )
        plays, source = data.matrix(), f"synthetic {args.users} users × {args.tracks} tracks, seed {args.seed}"
    inner, outer = holdout_split(plays, fraction=0.2, seed=args.seed + 100)
    print(f"{source}: {plays.nnz:,} plays; outer holdout {outer.nnz:,}", flush=True)
    s = Settings(tune_budget_s=args.budget)
    ImplicitALS(factors=8, iterations=1).fit(inner[:200])  # JIT warm-up outside the timings
    results: dict[str, Any] = {"data": source, "plays": int(plays.nnz), "outer_plays": int(outer.nnz)}

    t = time.perf_counter()
    m = encore_before(s, inner)
    results["encore_before"] = served(
        "encore_before", m.user_factors_, m.item_factors_, inner, outer, time.perf_counter() - t
    )
    for name, settings in (("encore_untuned", s.with_(tune=False)), ("encore_default", s)):
        t = time.perf_counter()
        chosen = ModelSearch(settings, LocalEngine(settings)).run(inner, None)
        row = served(
            name, chosen.model.user_factors_, chosen.model.item_factors_, inner, outer, time.perf_counter() - t
        )
        row["hyperparameters"] = chosen.params
        row["holdout_precision@10"] = chosen.metrics.get("precision@10")
        if chosen.tuning:
            row["trials"] = len(chosen.tuning["trials"])
            row["tuning_seconds"] = chosen.tuning["seconds"]
        results[name] = row
    t = time.perf_counter()
    full = model_for(s).fit(inner)
    results["full_fit"] = served(
        "full_fit", full.user_factors_, full.item_factors_, inner, outer, time.perf_counter() - t
    )
    t = time.perf_counter()
    imp, grid = implicit_grid(inner, s.iterations)
    results["implicit_grid"] = {
        **served("implicit_grid", imp.user_factors, imp.item_factors, inner, outer, time.perf_counter() - t),
        **grid,
    }
    base = results["implicit_grid"]["precision@10"]
    results["ratio_to_implicit_grid"] = {
        k: round(results[k]["precision@10"] / base, 4)
        for k in ("encore_before", "encore_untuned", "encore_default", "full_fit")
    }
    print("precision@10 / implicit grid:", results["ratio_to_implicit_grid"])
    write(args.out, results)


if __name__ == "__main__":
    main()
