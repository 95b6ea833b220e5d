"""Batch layer end to end: checkpoint load → train → publish, local engine vs Spark vs implicit.

    python -m bench.retrain [--size large] [--iterations 15] [--spark-iterations 3] [--rounds 2]
                            [--tune-budget 120] [--out retrain]

The play matrix is written as the trainer's checkpoint; the local engine's run is the trainer's
own `train_and_publish` path (holdout split, fit, evaluation, fold-in of all users, artifact,
pipelined publish to Redis, flip). implicit is timed on bare training of the same matrix and
iterations; Spark local[2] on `--spark-iterations` (reported per iteration and extrapolated),
since a full 15-iteration Spark run at 10M plays takes tens of minutes here.
The timed rounds run with ENCORE_TUNE off (fixed hyperparameters, comparable with implicit's
single fit); one more run with tuning on (the default) reports what the search costs: its
seconds, trials and winner, beside the untuned run. Writes bench/results/retrain.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from services.cli import process_defaults  # noqa: E402

process_defaults()  # what `encore` sets at start-up, before numba's threads start

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import redis  # noqa: E402

from bench.common import dataset, write  # noqa: E402
from core.evaluation import holdout_split, ranking_metrics  # noqa: E402
from services.batch.checkpoint import PlayMatrix  # noqa: E402
from services.batch.engines import SparkEngine, model_for  # noqa: E402
from services.cli.root import Root  # noqa: E402
from services.infra.embedded import EmbeddedServers  # noqa: E402
from services.infra.settings import Settings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="large")
    ap.add_argument("--iterations", type=int, default=15)
    ap.add_argument("--spark-iterations", type=int, default=3, help="0 skips Spark")
    ap.add_argument("--rounds", type=int, default=2, help="runs of implicit and of the local engine, alternated")
    ap.add_argument("--tune-budget", type=float, default=Settings().tune_budget_s, help="0 skips the tuned run")
    ap.add_argument("--out", default="retrain")
    args = ap.parse_args()
    data = dataset(args.size)
    m = data.matrix()
    out: dict[str, Any] = {
        "size": args.size,
        "users": m.shape[0],
        "tracks": m.shape[1],
        "nnz": int(m.nnz),
        "iterations": args.iterations,
        "factors": 64,
    }
    workdir = tempfile.mkdtemp(prefix="encore-bench-")
    pm = PlayMatrix(user_ids=list(data.user_ids), track_ids=list(data.track_ids), offsets={"bench|0": 0})
    pm._base = m
    pm.save(os.path.join(workdir, "checkpoint.npz"), time.time())
    settings = Settings(data_dir=workdir, iterations=args.iterations, factors=64, spark_master="local[2]", tune=False)
    train, test = holdout_split(m, fraction=0.1, seed=0)

    # implicit, bare training on the same training split and confidence.
    from implicit.cpu.als import AlternatingLeastSquares

    conf = train.copy()
    conf.data = model_for(settings).confidence_of(train.data)

    def implicit_fit() -> float:
        imp = AlternatingLeastSquares(
            factors=64, regularization=settings.regularization, alpha=1.0, iterations=args.iterations, random_state=0
        )
        t0 = time.perf_counter()
        imp.fit(conf, show_progress=False)
        seconds = time.perf_counter() - t0
        out["implicit_precision@10"] = ranking_metrics(
            imp.user_factors, imp.item_factors, train, test, max_users=2000
        ).precision
        print(f"  implicit: {seconds:.1f}s, p@10 {out['implicit_precision@10']:.4f}", flush=True)
        return seconds

    local_runs: list[dict[str, Any]] = []
    implicit_runs: list[float] = []
    with EmbeddedServers.start() as servers:
        settings = settings.with_(redis_url=servers.redis_url, kafka_bootstrap=servers.kafka_bootstrap)
        r = redis.Redis.from_url(servers.redis_url)
        # Alternate the contenders, `--rounds` times each: this machine's speed drifts by ±15 %
        # over minutes, and each is reported by its fastest run.
        for _ in range(args.rounds):
            implicit_runs.append(implicit_fit())
            t0 = time.perf_counter()
            root = Root(settings)
            trainer = root.trainer()  # loads the checkpoint; the plays topic is empty
            load_s = time.perf_counter() - t0
            version = trainer.train_and_publish()
            total = time.perf_counter() - t0
            meta = r.hgetall(root.keys.meta(version))
            local_runs.append(
                {
                    "checkpoint_load_s": load_s,
                    "end_to_end_s": total,
                    "stage_seconds": json.loads(meta[b"stage_seconds"]),
                    "precision@10": float(meta[b"precision@10"]),
                }
            )
            print(f"  local: {local_runs[-1]}", flush=True)
            trainer.close()
            root.close()
        if args.tune_budget > 0:
            tuned = settings.with_(tune=True, tune_budget_s=args.tune_budget)
            root = Root(tuned)
            trainer = root.trainer()
            t0 = time.perf_counter()
            version = trainer.train_and_publish()
            meta = r.hgetall(root.keys.meta(version))
            search = json.loads(meta[b"tuning"])
            out["tuned"] = {
                "budget_s": args.tune_budget,
                "end_to_end_s": time.perf_counter() - t0,
                "stage_seconds": json.loads(meta[b"stage_seconds"]),
                "trials": len(search["trials"]),
                "trial_seconds": [t.get("seconds") for t in search["trials"]],
                "winner": search["winner"],
                "precision@10": float(meta[b"precision@10"]),
            }
            print(f"  tuned: {out['tuned']}", flush=True)
            trainer.close()
            root.close()
    out["implicit_train_s_runs"] = implicit_runs
    out["implicit_train_s"] = min(implicit_runs)
    out["local_runs"] = local_runs
    out["local"] = min(local_runs, key=lambda x: x["end_to_end_s"])
    out["local_end_to_end_over_implicit_train"] = out["local"]["end_to_end_s"] / out["implicit_train_s"]
    stages = out["local"]["stage_seconds"]
    out["local_fit_over_implicit_train"] = (stages["fit"] + stages["refit"]) / out["implicit_train_s"]
    if "tuned" in out:
        out["tuning_cost_s"] = out["tuned"]["end_to_end_s"] - out["local"]["end_to_end_s"]
    out["target"] = "local end to end <= 1.2 x implicit bare training"
    print(f"  local end to end / implicit train: {out['local_end_to_end_over_implicit_train']:.2f}")

    if args.spark_iterations <= 0:
        write(args.out, out)
        return
    spark_settings = settings.with_(iterations=args.spark_iterations)
    t0 = time.perf_counter()
    sm = SparkEngine(spark_settings).fit(train)
    spark_s = time.perf_counter() - t0
    out["spark"] = {
        "iterations": args.spark_iterations,
        "wall_s": spark_s,
        "s_per_iter_incl_startup": spark_s / args.spark_iterations,
        "precision@10_at_these_iterations": ranking_metrics(
            sm.user_factors_, sm.item_factors_, train, test, max_users=2000
        ).precision,
    }
    print(f"  spark: {out['spark']}")
    write(args.out, out)


if __name__ == "__main__":
    main()
