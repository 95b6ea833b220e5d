"""Filtered search: Encore's over-fetch-and-widen vs hnswlib's filter callback vs exact, one run.

    python -m bench.filtered [--sizes 200000,1000000] [--queries 1000]

For each size: ALS-like track vectors (`bench.serving.track_vectors`), an inner-product HNSW
graph with ef chosen by measured recall (as `encore serve` does), and a catalogue in which a tag
passes 30 %, 10 % or 1 % of tracks, and "not explicit" passes 70 %. Per filter, top-10 latency
p50/p99 and recall@10 against the exact filtered top 10 (numpy over every track) for:
- `encore`: `core.filter_plans.planned_search`, the API's path: an exact scan of the passing
  tracks for a narrow filter, else the graph search below;
- `graph_overfetch`: `core.filters.search` alone (over-fetch to ef, widen when short);
- `hnswlib_filter`: hnswlib's own `knn_query(filter=...)`, the same graph and ef, a Python
  predicate per visited node;
- `exact`: a full scan with the mask (the reference; timed on fewer queries).
Unfiltered search is timed beside them. Writes bench/results/filtered.json.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.common import write
from bench.serving import pct, track_vectors
from core.catalogue import Catalogue, TrackInfo
from core.filter_plans import FilterPlans, planned_search
from core.filters import NO_FILTER, TrackFilter, search
from core.hnsw import HNSWIndex
from core.index_tuning import tune_ef
from core.version_meta import QUERY_SAMPLE
from services.cli import process_defaults

FILTERS = {
    "tag_30pct": TrackFilter(tags=frozenset({"thirty"})),
    "tag_10pct": TrackFilter(tags=frozenset({"ten"})),
    "tag_1pct": TrackFilter(tags=frozenset({"one"})),
    "not_explicit_70pct": TrackFilter(explicit=False),
}


def catalogue(n: int, seed: int = 5) -> tuple[Catalogue, dict[str, np.ndarray]]:
    """Tags spread at random (not by vector cluster: the hard case for a graph search)."""
    rng = np.random.default_rng(seed)
    u = rng.random(n)
    explicit = rng.random(n) < 0.3
    cat = Catalogue()
    for i in range(n):
        tags = frozenset(t for t, share in (("thirty", 0.3), ("ten", 0.10), ("one", 0.01)) if u[i] < share)
        cat.entries[f"t{i}"] = TrackInfo(f"t{i}", f"a{i % 5000}", tags=tags, explicit=bool(explicit[i]))
    masks = {
        "tag_30pct": u < 0.3,
        "tag_10pct": u < 0.10,
        "tag_1pct": u < 0.01,
        "not_explicit_70pct": ~explicit,
        "none": np.ones(n, bool),
    }
    return cat, masks


def run(n: int, queries: int) -> dict[str, Any]:
    v = track_vectors(n)
    ids = [f"t{i}" for i in range(n)]
    q_all = track_vectors(queries + QUERY_SAMPLE, seed=99)
    q, sample = q_all[:queries], q_all[queries:]
    t0 = time.perf_counter()
    index = HNSWIndex(64, "ip", capacity=n)
    index.upsert(ids, v)
    build_s = time.perf_counter() - t0
    choice = tune_ef(index, ids, v, queries=sample)
    index.set_ef(choice.ef)
    cat, masks = catalogue(n)
    scores = q @ v.T  # exact reference for every query
    out: dict[str, Any] = {"tracks": n, "build_s": build_s, "ef": choice.ef, "filters": {}}
    for name, flt in [("none", NO_FILTER), *FILTERS.items()]:
        mask = masks[name]
        masked = np.where(mask[None, :], scores, -np.inf)
        truth = [set(np.argpartition(-row, 10)[:10].tolist()) for row in masked]
        res: dict[str, Any] = {"pass_share": float(mask.mean())}
        plans = FilterPlans()
        subset = plans.subset(index, flt, cat)  # built once per filter, as a serving process does
        res["plan"] = (
            "graph_overfetch" if subset is None else "exact_subset" if subset.vectors is not None else "hnswlib_filter"
        )
        for method in ("encore", "graph_overfetch", "hnswlib_filter"):
            lat, hits = [], 0
            for i in range(queries):
                t = time.perf_counter()
                if method == "encore":
                    got = [int(x[1:]) for x, _ in planned_search(index, q[i], 10, flt, cat, plans)]
                elif method == "graph_overfetch":
                    got = [int(x[1:]) for x, _ in search(index, q[i], 10, flt, cat, index.ef)]
                else:
                    labels, _ = index.knn(q[i], 10, filter=_admits(mask))
                    got = labels[0].tolist()
                lat.append(time.perf_counter() - t)
                hits += len(truth[i] & set(got))
            res[method] = {"p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "recall@10": hits / (10 * queries)}
        lat = []
        for i in range(min(queries, 100)):
            t = time.perf_counter()
            row = (v @ q[i]).astype(np.float32)
            row[~mask] = -np.inf
            np.argpartition(-row, 10)[:10]
            lat.append(time.perf_counter() - t)
        res["exact"] = {"p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "recall@10": 1.0}
        res["encore_vs_hnswlib_filter_p99"] = res["encore"]["p99_ms"] / res["hnswlib_filter"]["p99_ms"]
        out["filters"][name] = res
        print(f"  {n} tracks, {name}: {res}", flush=True)
    return out


def main() -> None:
    process_defaults()
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="200000,1000000")
    ap.add_argument("--queries", type=int, default=1000)
    args = ap.parse_args()
    write("filtered", {"sizes": [run(int(n), args.queries) for n in args.sizes.split(",") if n]})


if __name__ == "__main__":
    main()


def _admits(mask: np.ndarray) -> Callable[[int], bool]:
    """hnswlib's filter callback for a boolean mask over labels."""
    return lambda lab: bool(mask[lab])
