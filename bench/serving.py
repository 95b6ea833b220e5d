"""Track index and HTTP serving: HNSW vs brute force, measured in the same run.

    python -m bench.serving [--sizes 200000,1000000] [--http-size 200000] [--rate 500]

In process (factors=64, inner product): build time, the ef chosen by measured recall (as
`encore serve` does), top-10 latency p50/p99 for HNSW and for exact numpy search in separate
passes, recall@10 of HNSW vs exact, an ef sweep, cost of replacing one vector. Over HTTP: an
`encore serve` process on embedded Redis and broker, open-loop load at a fixed rate on
a mix of personal, similar and anonymous requests; latency p50/p99 and errors. Writes bench/results/serving.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import urllib.request
from typing import Any

import numpy as np

from bench.common import write
from core.index import ExactIndex, HNSWIndex
from core.index_tuning import tune_ef


def track_vectors(n: int, dim: int = 64, seed: int = 0) -> np.ndarray:
    """Clustered vectors with a spread of norms, shaped like ALS track factors."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(50, n // 2000), dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        v = centers[rng.integers(0, len(centers), m)] + 0.7 * rng.standard_normal((m, dim)).astype(np.float32)
        out[s : s + m] = v * rng.lognormal(0, 0.3, (m, 1)).astype(np.float32)
    return out


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1000, q))


def _timed(hnsw: HNSWIndex, q: np.ndarray) -> tuple[list[float], list[set[str]]]:
    lat, got = [], []
    for i in range(len(q)):
        t = time.perf_counter()
        res = hnsw.query(q[i], 10)
        lat.append(time.perf_counter() - t)
        got.append({a for a, _ in res})
    return lat, got


def in_process(n: int, queries: int = 1000, sweep: tuple[int, ...] = (100, 200, 400, 800)) -> dict[str, Any]:
    """HNSW and exact search timed in separate passes (an exact scan flushes the caches)."""
    v = track_vectors(n)
    ids = [f"t{i}" for i in range(n)]
    # Queries stand for user vectors: drawn around other centres than the tracks. The first
    # `queries` are measured; 200 more of the same kind are the tuning sample, as the trainer's
    # sample of user vectors is for `encore serve` (ENCORE_INDEX_EF=0, the default).
    q_all = track_vectors(queries + 200, seed=99)
    q, sample = q_all[:queries], q_all[queries:]
    t0 = time.perf_counter()
    hnsw = HNSWIndex(64, "ip", capacity=n)
    hnsw.upsert(ids, v)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    choice = tune_ef(hnsw, ids, v, queries=sample)
    tune_s = time.perf_counter() - t0
    _timed(hnsw, q[:100])  # warm-up
    h_lat, h_got = _timed(hnsw, q)
    exact = ExactIndex(64, "ip")
    exact.upsert(ids, v)
    e_lat, truth = [], []
    for i in range(300):  # exact search is slow: a subset gives both its latency and the recall truth
        t = time.perf_counter()
        top = exact.query(q[i], 10)
        e_lat.append(time.perf_counter() - t)
        truth.append({a for a, _ in top})

    def recall(got: list[set[str]]) -> float:
        return sum(len(a & b) for a, b in zip(got, truth, strict=False)) / (10 * len(truth))

    trade_off = []
    for ef in sweep:
        hnsw.set_ef(ef)
        lat, got = _timed(hnsw, q)
        trade_off.append({"ef": ef, "recall@10": recall(got), "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)})
    hnsw.set_ef(choice.ef)
    upd = track_vectors(1000, seed=7)
    t = time.perf_counter()
    for j in range(1000):
        hnsw.upsert([ids[j * 7 % n]], upd[j : j + 1])
    update_ms = (time.perf_counter() - t) / 1000 * 1000
    res: dict[str, Any] = {
        "tracks": n,
        "build_s": build,
        "build_items_per_s": n / build,
        "ef_chosen": choice.ef,
        "ef_tuning": {"recall_on_sample": choice.recall, "sample_queries": choice.queries, "seconds": tune_s},
        "hnsw_p50_ms": pct(h_lat, 50),
        "hnsw_p99_ms": pct(h_lat, 99),
        "exact_p50_ms": pct(e_lat, 50),
        "exact_p99_ms": pct(e_lat, 99),
        "recall@10": recall(h_got),
        "ef_sweep": trade_off,
        "update_ms_per_vector": update_ms,
    }
    res["speedup_p50_exact_over_hnsw"] = res["exact_p50_ms"] / res["hnsw_p50_ms"]
    res["speedup_p99_exact_over_hnsw"] = res["exact_p99_ms"] / res["hnsw_p99_ms"]
    print(f"  {n} tracks: {res}")
    return res


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def http(n_tracks: int, rate: float, seconds: float) -> dict[str, Any]:
    import redis

    from core.als import ImplicitALS
    from services import model_store
    from services.embedded import EmbeddedServers, free_port, spawn
    from services.keys import Keys

    servers = EmbeddedServers.start()
    try:
        n_users = 20_000
        model = ImplicitALS(factors=64)
        model.item_factors_ = track_vectors(n_tracks)
        model.user_factors_ = track_vectors(n_users, seed=5)
        r = redis.Redis.from_url(servers.redis_url)
        model_store.publish(
            r,
            Keys(),
            "bench",
            model,
            [f"u{i}" for i in range(n_users)],
            [f"t{i}" for i in range(n_tracks)],
            {},
        )
        rng = np.random.default_rng(3)
        pipe = r.pipeline(transaction=False)
        for u in range(n_users):  # 30 played tracks each: personal requests exclude them
            pipe.hset(Keys().history(f"u{u}"), mapping={f"t{t}": 1.0 for t in rng.integers(0, n_tracks, 30)})
        pipe.execute()
        port = free_port()
        env = {
            **os.environ,
            "ENCORE_KAFKA_BOOTSTRAP": servers.kafka_bootstrap,
            "ENCORE_REDIS_URL": servers.redis_url,
            "ENCORE_DATA_DIR": servers.workdir,
        }
        cmd = [sys.executable, "-m", "services.cli", "serve", "--port", str(port)]
        proc = spawn(cmd, os.path.join(servers.workdir, "serve.log"), env)
        url = f"http://127.0.0.1:{port}"
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 900:
            try:
                if urllib.request.urlopen(f"{url}/ready", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(1)
        ready_s = time.perf_counter() - t0
        index_info = json.loads(urllib.request.urlopen(f"{url}/ready", timeout=5).read()).get("index")
        cpu0 = _cpu_seconds(proc.pid)
        lat: list[float] = []
        errors = [0]
        by_route: dict[str, list[float]] = {}
        total = int(rate * seconds)
        start = time.perf_counter() + 0.5
        lock = threading.Lock()

        def worker(k: int, step: int) -> None:
            import http.client

            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            for i in range(k, total, step):
                due = start + i / rate
                now = time.perf_counter()
                if due > now:
                    time.sleep(due - now)
                kind = ("personal",) * 7 + ("similar",) * 2 + ("anonymous",)
                route = kind[i % 10]
                try:
                    if route == "personal":
                        conn.request("GET", f"/recommendations/u{i % n_users}?n=10")
                    elif route == "similar":
                        conn.request("GET", f"/similar/t{(i * 31) % n_tracks}?n=10")
                    else:
                        plays = [{"track_id": f"t{(i * 7 + j * 101) % n_tracks}", "count": 2} for j in range(5)]
                        body = json.dumps({"plays": plays, "n": 10})
                        conn.request("POST", "/recommendations", body, {"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    resp.read()
                    ok = resp.status == 200
                except OSError:
                    ok = False
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                # Open loop: latency counts from when the request was due, not when it was sent.
                with lock:
                    lat.append(time.perf_counter() - due)
                    by_route.setdefault(route, []).append(lat[-1])
                    errors[0] += 0 if ok else 1

        threads = [threading.Thread(target=worker, args=(k, 16)) for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        achieved = total / (time.perf_counter() - start)
        serve_cores = (_cpu_seconds(proc.pid) - cpu0) / (time.perf_counter() - start)
        proc.terminate()
        proc.wait(timeout=30)
        res = {
            "tracks": n_tracks,
            "target_rps": rate,
            "achieved_rps": achieved,
            "requests": total,
            "errors": errors[0],
            "p50_ms": pct(lat, 50),
            "p99_ms": pct(lat, 99),
            "p99_ms_by_route": {k: pct(v, 99) for k, v in by_route.items()},
            "mix": "70% /recommendations/{user} (30 played tracks excluded), 20% /similar, 10% POST anonymous",
            "target_p99_ms": 20,
            "index_ready_s": ready_s,
            "index": index_info,
            "serve_cpu_cores_during_load": serve_cores,
        }
        print(f"  HTTP: {res}")
        return res
    finally:
        servers.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="200000,1000000")
    ap.add_argument("--http-size", type=int, default=200_000)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    out: dict[str, Any] = {"in_process": [in_process(int(n)) for n in args.sizes.split(",") if n]}
    if args.http_size:
        out["http"] = http(args.http_size, args.rate, args.seconds)
    write("serving", out)


if __name__ == "__main__":
    main()
