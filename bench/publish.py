"""The publish stage of a retrain on one Redis and on a Redis Cluster, in one run.

    python -m bench.publish [--users 500000] [--tracks 200000] [--rounds 2] [--cluster-replicas 1] [--out NAME]

Publishing a version writes every user and track vector (64 float32), the meta and the id list,
then flips `model:current`: what `bench.retrain` times as "publish" at 10M plays (500k users,
200k tracks). Here the vectors are random (training is not what is measured) and the same model
is published alternately to an embedded single Redis and an embedded 3-master cluster (with
replicas), `--rounds` times each; both are emptied between rounds, and each round starts once
the cluster's replicas have applied everything (their catch-up would otherwise run into the
next round, whichever topology it measures). On the cluster the vectors go
through `cluster_io.mset_per_node` (one MSET per slot, one pipeline per node, nodes in
parallel). Writes bench/results/publish.json.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
from redis.cluster import RedisCluster

from bench.common import write
from core.als import ImplicitALS
from services.cli.root import Root
from services.infra.embedded import EmbeddedServers
from services.infra.embedded_cluster import EmbeddedRedisCluster
from services.infra.model_store import new_version
from services.infra.settings import Settings


def _model(users: int, tracks: int, factors: int = 64) -> ImplicitALS:
    rng = np.random.default_rng(0)
    m = ImplicitALS(factors=factors)
    m.user_factors_ = rng.standard_normal((users, factors), dtype=np.float32)
    m.item_factors_ = rng.standard_normal((tracks, factors), dtype=np.float32)
    return m


def _publish_s(url: str, model: ImplicitALS, user_ids: list[str], track_ids: list[str]) -> float:
    root = Root(Settings(redis_url=url, key_prefix="bench:"))
    try:
        models = root.models()
        t0 = time.perf_counter()
        models.publish(new_version(), model, user_ids, track_ids, {})
        return time.perf_counter() - t0
    finally:
        r: Any = root.redis
        if isinstance(r, RedisCluster):
            r.flushall(target_nodes=RedisCluster.PRIMARIES)
        else:
            r.flushall()
        root.close()


def _settle(url: str, timeout_s: float = 60.0) -> float:
    """Wait until every replica has applied what its master holds, so that one round's
    replication does not run into the next round (on either topology); seconds waited."""
    t0 = time.perf_counter()
    rc = RedisCluster.from_url(url)
    try:
        while time.perf_counter() - t0 < timeout_s:
            behind = 0
            for node in rc.get_primaries():
                info = rc.info("replication", target_nodes=node)
                offsets = [v["offset"] for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
                behind += sum(info["master_repl_offset"] > o for o in offsets)
            if not behind:
                break
            time.sleep(0.05)
    finally:
        rc.close()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=500_000)
    ap.add_argument("--tracks", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cluster-replicas", type=int, default=1, help="replicas per master of the embedded cluster")
    ap.add_argument("--out", default="", help="results file name (default publish[_replicasN])")
    args = ap.parse_args()
    model = _model(args.users, args.tracks)
    user_ids = [f"u{i}" for i in range(args.users)]
    track_ids = [f"t{i}" for i in range(args.tracks)]
    runs: dict[str, list[float]] = {"single": [], "cluster": []}
    with (
        EmbeddedServers.start(kafka=False) as single,
        EmbeddedRedisCluster.start(masters=3, replicas=args.cluster_replicas) as cluster,
    ):
        for _ in range(args.rounds):
            for name, url in (("single", single.redis_url), ("cluster", cluster.url)):
                runs[name].append(_publish_s(url, model, user_ids, track_ids))
                settled = _settle(cluster.url)
                print(f"  {name}: {runs[name][-1]:.2f} s (replicas in step {settled:.1f} s later)", flush=True)
    best = {k: min(v) for k, v in runs.items()}
    out = {
        "users": args.users,
        "tracks": args.tracks,
        "factors": 64,
        "cluster_replicas_per_master": args.cluster_replicas,
        "seconds": runs,
        "best_s": best,
        "vectors_per_s": {k: (args.users + args.tracks) / v for k, v in best.items()},
        "cluster_vs_single_throughput": best["single"] / best["cluster"],
    }
    print(out)
    default = "publish" if args.cluster_replicas == 1 else f"publish_replicas{args.cluster_replicas}"
    write(args.out or default, out)


if __name__ == "__main__":
    main()
