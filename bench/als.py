"""Encore's ImplicitALS vs the `implicit` package, same data, same cores, same objective.

    python -m bench.als [--sizes small,medium,large] [--rounds 2] [--iterations 15] [--speed-iterations 5] [--out als]

Speed: seconds per iteration at factors=64, CG for both, the two alternated `--rounds` times in
fresh children (median reported, every run listed), with the FLOPs of an iteration and the
rate achieved (`compute_floor`). Sizes: small ≈ 300k plays, medium ≈ 2M, large ≈ 8M (the
training part of 10M after the holdout).
Quality: precision@10 / NDCG@10 on a per-user holdout, Encore's defaults vs implicit's best over
a small grid, and each library's best over the same grid. Fold-in: 1,000 users × ~50 plays.
Memory: peak RSS of each fit in its own child process vs (play matrix + factors).
Writes bench/results/als.json (or `--out`).
"""

from __future__ import annotations

import os

# implicit asks for a single-threaded BLAS (its own threads parallelise); give it what it wants.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402

from bench.common import dataset, in_child, write  # noqa: E402
from core.als import ImplicitALS  # noqa: E402
from core.evaluation import holdout_split, ranking_metrics  # noqa: E402


def implicit_model(factors: int, reg: float, iterations: int, cg: bool) -> Any:
    from implicit.cpu.als import AlternatingLeastSquares

    return AlternatingLeastSquares(
        factors=factors,
        regularization=reg,
        alpha=1.0,
        iterations=iterations,
        use_cg=cg,
        calculate_training_loss=False,
        random_state=0,
    )


def as_implicit_confidence(m: sp.csr_matrix, model: ImplicitALS) -> sp.csr_matrix:
    """implicit weights observed entries by the matrix value itself (c = α·value, α=1 here)."""
    out = m.copy().astype(np.float32)
    out.data = model.confidence_of(m.data)
    return out


def speed(train: sp.csr_matrix, iterations: int, factors: int, rounds: int) -> dict[str, Any]:
    res: dict[str, Any] = {
        "iterations": iterations,
        "factors": factors,
        "nnz": int(train.nnz),
        "users": train.shape[0],
        "tracks": train.shape[1],
    }
    payload_mb = (
        train.data.nbytes + train.indices.nbytes + train.indptr.nbytes + 4 * factors * sum(train.shape)
    ) / 2**20
    res["matrix_plus_factors_mb"] = payload_mb

    def enc(solver: str) -> dict[str, Any]:
        ImplicitALS(factors=factors, iterations=1).fit(train[:100])  # JIT warm-up (this k) outside the timing
        m = ImplicitALS(factors=factors, iterations=iterations, solver=solver, random_state=0).fit(train)  # type: ignore[arg-type]
        return {"s_per_iter": float(np.mean(m.iteration_seconds_))}

    def imp(cg: bool) -> dict[str, Any]:
        conf = as_implicit_confidence(train, ImplicitALS())
        model = implicit_model(factors, 0.05, iterations, cg)
        t0 = time.perf_counter()
        model.fit(conf, show_progress=False)
        return {"s_per_iter": (time.perf_counter() - t0) / iterations}

    runs: dict[str, list[dict[str, Any]]] = {"encore_cg": [], "implicit_cg": []}
    for r in range(rounds):  # alternated, so drift in the machine's speed hits both alike
        for name, fn in (("encore_cg", lambda: enc("cg")), ("implicit_cg", lambda: imp(True))):
            run = in_child(fn)
            runs[name].append(run)
            print(f"  round {r + 1} {name}: {run['s_per_iter']:.3f} s/iter, peak RSS {run['peak_rss_mb']:.0f} MB")
    for name, rs in runs.items():
        res[name] = {
            "s_per_iter": float(np.median([x["s_per_iter"] for x in rs])),
            "runs_s_per_iter": [x["s_per_iter"] for x in rs],
            "peak_rss_mb": max(x["peak_rss_mb"] for x in rs),
            "rss_at_start_mb": min(x["rss_at_start_mb"] for x in rs),
        }
    per_round = [e["s_per_iter"] / i["s_per_iter"] for e, i in zip(runs["encore_cg"], runs["implicit_cg"], strict=True)]
    res["ratio_cg_encore_over_implicit"] = res["encore_cg"]["s_per_iter"] / res["implicit_cg"]["s_per_iter"]
    res["ratio_per_round"] = per_round
    res["encore_peak_over_payload"] = (
        res["encore_cg"]["peak_rss_mb"] - res["encore_cg"]["rss_at_start_mb"]
    ) / payload_mb
    res["compute_floor"] = compute_floor(train, factors, res["encore_cg"]["s_per_iter"])
    return res


def compute_floor(train: sp.csr_matrix, k: int, s_per_iter: float, steps: int = 3) -> dict[str, float]:
    """FLOPs of one CG iteration as Encore computes it, and the rate achieved.

    Per row and pass (the residual, then each of `steps` steps): a dense YtY product (2k²)
    and, per play, a dot and an axpy (4k). Both halves, users and tracks."""
    rows = sum(train.shape)
    dense = rows * (steps + 1) * 2 * k * k
    sparse = 2 * train.nnz * (steps + 1) * 4 * k
    flops = dense + sparse
    return {
        "gflop_per_iter": flops / 1e9,
        "gflop_dense_yty": dense / 1e9,
        "gflop_sparse_gathered": sparse / 1e9,
        "achieved_gflops": flops / 1e9 / s_per_iter,
    }


def quality(train: sp.csr_matrix, test: sp.csr_matrix, iterations: int) -> dict[str, Any]:
    def metrics(U: np.ndarray, V: np.ndarray) -> dict[str, float]:
        m = ranking_metrics(U, V, train, test, k=10, max_users=5000)
        return {"precision@10": m.precision, "ndcg@10": m.ndcg}

    grid = [(c, a, r) for c in ("linear", "log") for a in (1.0, 5.0, 20.0) for r in (0.05, 1.0)]
    out: dict[str, Any] = {"grid": [], "iterations": iterations}
    d = ImplicitALS(iterations=iterations, random_state=0).fit(train)
    out["encore_defaults"] = metrics(d.user_factors_, d.item_factors_)
    for conf, alpha, reg in grid:
        params = {"confidence": conf, "alpha": alpha, "regularization": reg}
        e = ImplicitALS(iterations=iterations, random_state=0, **params).fit(train)  # type: ignore[arg-type]
        im = implicit_model(64, reg, iterations, True)
        im.fit(as_implicit_confidence(train, e), show_progress=False)
        row: dict[str, Any] = {
            **params,
            "encore": metrics(e.user_factors_, e.item_factors_),
            "implicit": metrics(im.user_factors, im.item_factors),
        }
        out["grid"].append(row)
        print(f"  {params}: encore {row['encore']['precision@10']:.4f} implicit {row['implicit']['precision@10']:.4f}")
    best_imp = max(r["implicit"]["precision@10"] for r in out["grid"])
    best_enc = max(r["encore"]["precision@10"] for r in out["grid"])
    out["implicit_best_precision@10"] = best_imp
    out["encore_best_precision@10"] = best_enc
    out["defaults_over_implicit_best"] = out["encore_defaults"]["precision@10"] / best_imp
    out["encore_best_over_implicit_best"] = best_enc / best_imp
    return out


def fold_in(train: sp.csr_matrix, test: sp.csr_matrix, iterations: int) -> dict[str, Any]:
    users = train.shape[0]
    late = np.arange(users - max(1000, users // 10), users)
    early = ImplicitALS(iterations=iterations, random_state=0).fit(train[: late[0]])
    joint = ImplicitALS(iterations=iterations, random_state=0).fit(train)
    rng = np.random.default_rng(0)
    rows = sp.random(
        1000,
        train.shape[1],
        density=50 / train.shape[1],
        format="csr",
        random_state=rng,
        data_rvs=lambda n: rng.integers(1, 10, n),
    ).astype(np.float32)
    early.fold_in_users(rows[:10])
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        early.fold_in_users(rows)
        times.append(time.perf_counter() - t0)
    folded = early.fold_in_users(train[late])
    p_fold = ranking_metrics(folded, early.item_factors_, train[late], test[late]).precision
    p_joint = ranking_metrics(joint.user_factors_[late], joint.item_factors_, train[late], test[late]).precision
    return {
        "users": 1000,
        "plays_per_user": float(rows.nnz / 1000),
        "ms_best_of_5": 1000 * min(times),
        "ms_median_of_5": 1000 * float(np.median(times)),
        "precision_folded": p_fold,
        "precision_joint": p_joint,
        "folded_over_joint": p_fold / p_joint,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="small,medium,large")
    ap.add_argument("--rounds", type=int, default=2, help="alternated runs of each contender per size")
    ap.add_argument("--iterations", type=int, default=15)
    ap.add_argument("--speed-iterations", type=int, default=5)
    ap.add_argument("--out", default="als", help="results file name under bench/results (no .json)")
    args = ap.parse_args()
    out: dict[str, Any] = {}
    splits = {}
    # Speed runs fork a child per contender: all of them run before this process starts
    # an OpenMP pool of its own (quality runs), as forking after that is unsafe.
    for size in args.sizes.split(","):
        data = dataset(size)
        splits[size] = holdout_split(data.matrix(), seed=0)
        train = splits[size][0]
        print(f"[{size}] {train.shape[0]} users × {train.shape[1]} tracks, {train.nnz} plays")
        out[size] = {"speed": speed(train, args.speed_iterations, 64, args.rounds)}
    for size, (train, test) in splits.items():
        if size == "small":
            print(f"[{size}] quality and fold-in")
            out[size]["quality"] = quality(train, test, args.iterations)
            out[size]["fold_in"] = fold_in(train, test, args.iterations)
            print(f"  fold-in: {out[size]['fold_in']}")
    write(args.out, out)


if __name__ == "__main__":
    main()
