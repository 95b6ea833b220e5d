"""Speed-layer freshness: produce → user's updated vector readable in Redis.

    python -m bench.freshness [--rate 5000] [--seconds 20] [--backlog 200000] [--topologies redis,cluster]

Embedded broker and Redis, a model at factors=64 published, one `encore foldin` process.
(1) At a fixed background produce rate, probe users (one play each, fresh ids) are timed from
send to their vector key existing in Redis: p50/p99. (2) Maximum sustained throughput: a
backlog of plays is produced first, then one worker is timed until it has applied all of it and
re-solved every user it queued (the queue empty). `--modes thread,inline` runs each topology
with the worker's re-solve thread and then without it (`ENCORE_RESOLVE_THREAD=false`), in one run.
Both on one Redis and, in the same run, on an embedded Redis Cluster (3 masters + 3 replicas,
64 buckets, the default), with the cluster's ratios to the single node. Writes bench/results/freshness.json
(single node at the top level as before, the cluster under `cluster`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import redis

from bench.common import write
from bench.serve_probe import gc_pauses
from bench.worker_probe import redis_stalls, scrape, stage_profile
from core.als import ImplicitALS
from core.synthetic import SyntheticMusic
from services.cli import process_defaults
from services.cli.root import Root
from services.infra.embedded import EmbeddedServers, free_port, spawn
from services.infra.embedded_cluster import EmbeddedRedisCluster
from services.infra.keys import Keys
from services.infra.model_store import RedisModelStore, new_version
from services.infra.settings import Settings
from services.produce import PlayPublisher
from services.speed.cluster_history_store import ClusterHistoryStore
from services.speed.history_store import RedisHistoryStore


def _worker(servers: EmbeddedServers, settings: Settings, metrics_port: int = 0) -> subprocess.Popen[bytes]:
    env = {
        "ENCORE_RESOLVE_THREAD": str(settings.resolve_thread).lower(),
        **os.environ,
        "ENCORE_METRICS_PORT": str(metrics_port),
        "ENCORE_KAFKA_BOOTSTRAP": servers.kafka_bootstrap,
        "ENCORE_REDIS_URL": settings.redis_url,
        "ENCORE_PLAYS_TOPIC": settings.plays_topic,
        "ENCORE_KEY_PREFIX": settings.key_prefix,
    }
    log = os.path.join(servers.workdir, f"foldin-{settings.plays_topic}.log")
    return spawn([sys.executable, "-m", "services.cli", "foldin"], log, env)


def main() -> None:
    process_defaults()  # what `encore` sets at start-up, before numba starts its threads
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=5000.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--backlog", type=int, default=200_000)
    ap.add_argument("--topologies", default="redis,cluster", help="comma-separated: redis, cluster")
    ap.add_argument("--cluster-replicas", type=int, default=1, help="replicas per master of the embedded cluster")
    ap.add_argument("--phases", default="latency,throughput", help="comma-separated: latency, throughput")
    ap.add_argument("--modes", default="thread", help="comma-separated: thread, inline (the re-solve's thread)")
    ap.add_argument("--out", default="", help="results name (default: freshness[_cluster_no_replicas])")
    ap.add_argument("--rounds", type=int, default=1, help="throughput phases per topology, alternated")
    args = ap.parse_args()
    data = SyntheticMusic(n_users=50_000, n_tracks=20_000, mean_plays=45, n_genres=40, seed=3)
    model = ImplicitALS(factors=64, iterations=5, random_state=0).fit(data.matrix())
    out: dict[str, Any] = {"factors": 64, "tracks": data.n_tracks}
    modes = args.modes.split(",")
    with EmbeddedServers.start() as servers:
        for topology in args.topologies.split(","):
            for mode in modes:
                print(f"{topology} ({mode}):")
                # the first mode's results where they always were; the others beside them
                at = "" if mode == modes[0] else f"_{mode}"
                if topology == "cluster":
                    with EmbeddedRedisCluster.start(masters=3, replicas=args.cluster_replicas) as cluster:
                        out[f"cluster{at}"] = run(servers, cluster.url, topology, data, model, args, mode)
                        out[f"cluster{at}"]["replicas_per_master"] = args.cluster_replicas
                elif at:
                    out[f"redis{at}"] = run(servers, servers.redis_url, topology, data, model, args, mode)
                else:
                    out.update(run(servers, servers.redis_url, topology, data, model, args, mode))
        if args.rounds > 1 and "throughput" in args.phases:
            out["rounds"] = more_rounds(servers, data, model, args, out)
    out["modes"] = modes
    out["experiment_join"] = os.environ.get("ENCORE_EXPERIMENT_JOIN", "true")  # the worker inherits it
    if "cluster" in out:  # each phase that ran on both (`--phases` may leave one out)
        c, one = out["cluster"], out
        ratios = {
            f: c[phase][f] / one[phase][f]
            for phase, f in (("throughput", "events_per_s"), ("latency", "p99_ms"))
            if phase in c and phase in one
        }
        if ratios:
            out["cluster_vs_single"] = ratios
            print(f"  cluster vs single: {ratios}")
    default = "freshness" if args.cluster_replicas == 1 else "freshness_cluster_no_replicas"
    write(args.out or default, out)


def more_rounds(servers: EmbeddedServers, data: SyntheticMusic, model: ImplicitALS, args: Any, first: dict) -> dict:
    """Throughput phases 2..N, topologies alternated within each round (the first mode only).
    The machine's speed drifts over minutes, so a ratio of two phases run minutes apart carries
    that drift: the median of per-round ratios carries less of it."""
    mode, topologies = args.modes.split(",")[0], args.topologies.split(",")
    rows = [{t: (first if t == "redis" else first[t])["throughput"]["events_per_s"] for t in topologies}]
    for i in range(1, args.rounds):
        row = {}
        for topology in topologies:
            print(f"round {i + 1}, {topology}:")
            if topology == "cluster":
                with EmbeddedRedisCluster.start(masters=3, replicas=args.cluster_replicas) as cluster:
                    got = run(servers, cluster.url, f"cluster-r{i}", data, model, args, mode, ["throughput"])
            else:
                got = run(servers, servers.redis_url, f"redis-r{i}", data, model, args, mode, ["throughput"])
            row[topology] = got["throughput"]["events_per_s"]
        rows.append(row)
    out: dict[str, Any] = {"events_per_s": rows}
    if set(topologies) >= {"redis", "cluster"}:
        ratios = [r["cluster"] / r["redis"] for r in rows]
        out |= {"cluster_vs_single": ratios, "cluster_vs_single_median": float(np.median(ratios))}
    print(f"  rounds: {out}")
    return out


def run(
    servers: EmbeddedServers,
    url: str,
    tag: str,
    data: SyntheticMusic,
    model: ImplicitALS,
    args: Any,
    mode: str = "thread",
    phases: list[str] | None = None,
) -> dict[str, Any]:
    """Both phases (or `phases`) against one Redis or one Redis Cluster."""
    out: dict[str, Any] = {"resolve_thread": mode == "thread"}
    for phase in phases or args.phases.split(","):
        settings = Settings(
            kafka_bootstrap=servers.kafka_bootstrap,
            redis_url=url,
            plays_topic=f"plays-{phase}-{tag}-{mode}",
            key_prefix=f"{phase}-{mode}-{tag}:",
            resolve_thread=mode == "thread",
        )
        root = Root(settings)
        r, keys = root.redis, root.keys
        root.clients.ensure_topics()
        version = new_version()
        RedisModelStore(r, keys).publish(version, model, list(data.user_ids), list(data.track_ids), {})
        pub = PlayPublisher.connect(servers.kafka_bootstrap, settings.plays_topic)
        events = list(data.events(args.backlog if phase == "throughput" else int(args.rate * args.seconds)))
        if phase == "latency":
            out["latency"] = latency(servers, settings, r, keys, version, pub, events, args.rate)
        else:
            for ev in events:
                pub.publish_raw(str(ev["user_id"]).encode(), json.dumps(ev).encode())
            pub.flush()
            store = root.history_store()
            incarnation = root.clients.topic_incarnation(settings.plays_topic)
            t0 = time.perf_counter()
            port = free_port()
            proc = _worker(servers, settings, port)
            first, first_n, applied_at = 0.0, 0, 0.0
            while time.perf_counter() - t0 < 900:
                n = applied(store, incarnation)
                if n and not first:
                    first, first_n = time.perf_counter(), n
                if n >= len(events):
                    applied_at = applied_at or time.perf_counter()
                    if store.backlog(())[0] == 0:  # every queued user re-solved
                        break
                time.sleep(0.05)
            end = time.perf_counter()
            out["throughput"] = {
                "events": len(events),
                "applied_events_per_s": (len(events) - first_n) / (applied_at - first) if applied_at else 0.0,
                "seconds_incl_group_join": end - t0,
                "events_per_s_incl_group_join": len(events) / (end - t0),
                # sustained: from the first applied batch to the last, excluding start-up
                "events_per_s": (len(events) - first_n) / (end - first),
                "target_events_per_s": 20_000,
            }
            body = scrape(port)
            out["throughput"]["stages"] = stage_profile(body, len(events))
            out["throughput"]["gc"] = gc_pauses(body)
            print(f"    gc pauses: {out['throughput']['gc']}")
            print(f"  throughput: {out['throughput']}")
            proc.terminate()
            proc.wait(timeout=30)
        pub.close()
        root.close()
    return out


def applied(store: RedisHistoryStore | ClusterHistoryStore, incarnation: str) -> int:
    """Messages the state covers (on a cluster: up to the lowest bucket fence per partition)."""
    return sum(o + 1 for o in store.applied_offsets(incarnation).values())


def latency(
    servers: EmbeddedServers,
    settings: Settings,
    r: redis.Redis,
    keys: Keys,
    version: str,
    pub: PlayPublisher,
    events: list[dict[str, object]],
    rate: float,
) -> dict[str, Any]:
    port = free_port()
    proc = _worker(servers, settings, port)
    stalls_before = redis_stalls(r)
    pub.publish("warm-up", "t1", ms_played=100_000)
    pub.flush()
    while not r.exists(keys.user(version, "warm-up")):
        time.sleep(0.05)  # the group has formed and the model is loaded
    sent: dict[str, float] = {}
    done: dict[str, float] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set() or len(done) < len(sent):
            waiting = [u for u in list(sent) if u not in done]
            if waiting:
                pipe = r.pipeline(transaction=False)
                for u in waiting:
                    pipe.exists(keys.user(version, u))
                now = time.perf_counter()
                for u, ok in zip(waiting, pipe.execute(), strict=True):
                    if ok:
                        done[u] = now
            time.sleep(0.002)
            if stop.is_set() and time.perf_counter() - stop_at[0] > 30:
                break

    stop_at = [0.0]
    # The synthetic data and events live in this process too: frozen out of its collector's
    # sight, or a full collection (hundreds of ms) stops the watcher and the producer, and the
    # probes sent around it look late.
    gc.collect()
    gc.freeze()
    th = threading.Thread(target=watch)
    th.start()
    t0 = time.perf_counter()
    for i, ev in enumerate(events):
        due = t0 + i / rate
        if due > time.perf_counter():
            time.sleep(max(0.0, due - time.perf_counter()))
        pub.publish_raw(str(ev["user_id"]).encode(), json.dumps(ev).encode())
        if i % 25 == 0:
            # Timed from the produce call, the producer's 5 ms linger included. Until 12-06 every
            # probe was flushed on its own: 200 waits for the broker a second held this loop to
            # about 2,100 plays/s on a busy evening, well under `rate` (see `achieved_rate`).
            probe = f"probe-{i}"
            t_send = time.perf_counter()
            pub.publish(probe, str(ev["track_id"]), ms_played=100_000)
            sent[probe] = t_send
    pub.flush()
    stop_at[0] = time.perf_counter()
    achieved = (len(events) + len(sent)) / (stop_at[0] - t0)
    stop.set()
    th.join()
    # at this rate the batches are small: per-batch costs (round trips, flushes) dominate
    body = scrape(port)
    stages = stage_profile(body, len(events) + len(sent))
    pauses = gc_pauses(body)
    print(f"    gc pauses: {pauses}")
    stalls = {k: v - stalls_before[k] if k != "latest_fork_usec" else v for k, v in redis_stalls(r).items()}
    proc.terminate()
    proc.wait(timeout=30)
    lat = [done[u] - sent[u] for u in sent if u in done]
    res = {
        "rate": rate,
        "achieved_rate": round(achieved),  # what the load generator managed: below `rate`, it was the limit
        "probes": len(sent),
        "seen": len(lat),
        "p50_ms": float(np.percentile(lat, 50) * 1000),
        "p99_ms": float(np.percentile(lat, 99) * 1000),
        "max_ms": float(max(lat) * 1000),
        "batch_max_ms": int(os.environ.get("ENCORE_BATCH_MAX_MS", settings.batch_max_ms)),  # what the worker ran with
        "stages": stages,
        "gc": pauses,
        "redis_stalls": stalls,  # during the phase (the latest fork's duration as is)
        # the slowest 1 % as (seconds into the phase when sent, ms): one stall or a spread?
        "slowest": sorted(
            ((round(sent[u] - t0, 2), round((done[u] - sent[u]) * 1000)) for u in sent if u in done),
            key=lambda p: -p[1],
        )[: max(1, len(lat) // 100)],
    }
    print(f"  latency: {res}")
    return res


if __name__ == "__main__":
    main()
