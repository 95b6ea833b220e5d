"""What bench.freshness reads from a running fold-in worker and its Redis: the worker's own
stage timer (scraped from its metrics port) and one Redis's stall counters."""

from __future__ import annotations

import urllib.request
from typing import Any

import redis
from prometheus_client.parser import text_string_to_metric_families


def scrape(port: int) -> str:
    """The worker's Prometheus text, once per phase, for `stage_profile` and `gc_pauses`
    (`bench.serve_probe`'s, which reads the serving processes' alike)."""
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def stage_profile(body: str, events: int) -> dict[str, Any]:
    """The worker's own per-stage totals (`encore_foldin_stage_seconds`), scraped at the end of
    the run: seconds, share of the busy time, and microseconds per play."""
    seconds = {
        sample.labels["stage"]: sample.value
        for family in text_string_to_metric_families(body)
        if family.name == "encore_foldin_stage_seconds"
        for sample in family.samples
        if sample.name.endswith("_total")
    }
    busy = sum(v for k, v in seconds.items() if k != "poll")
    profile = {
        k: {
            "seconds": round(v, 3),
            "share_of_busy": round(v / busy, 3) if busy else 0.0,
            "us_per_play": round(v / events * 1e6, 2),
        }
        for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])
    }
    for k, v in profile.items():
        print(f"    {k:15s} {v['seconds']:8.2f} s  {100 * v['share_of_busy']:5.1f} %  {v['us_per_play']:7.2f} µs/play")
    return profile


STALL_FIELDS = ("aof_rewrites", "total_forks", "latest_fork_usec", "aof_delayed_fsync")


def redis_stalls(r: redis.Redis) -> dict[str, int]:
    """What can stop one Redis for a while (an AOF rewrite's fork, a delayed fsync): counters to
    difference over a phase. Empty on a cluster (its nodes are asked by no one here)."""
    if isinstance(r, redis.RedisCluster):
        return {}
    info = r.info()
    return {k: int(info.get(k, 0)) for k in STALL_FIELDS}
