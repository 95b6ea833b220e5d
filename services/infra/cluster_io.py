"""Redis Cluster plumbing: detection, one pipeline per node, and the bucket-count guard.

redis-py's cluster pipeline refuses scripts (EVALSHA), and the speed layer runs one fenced
script per hash-tag bucket. `per_node` groups such calls by the node that owns each call's
first key and sends every group as one plain pipeline to that node: one round trip per node
per step, never one per user or per bucket. A MOVED or ASK reply (a failover or a reshard
moved the slot) or a lost node makes the whole call fail after the client re-learns the
topology; the caller's step is retried whole, which its fences make safe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis
from redis.cluster import RedisCluster

log = logging.getLogger(__name__)

Call = tuple[str, Callable[[Any], object]]  # (a key the call touches, adds it to a pipeline)


def cmd(name: str, key: str, *args: Any, **kwargs: Any) -> Call:
    """A plain command on `key` (e.g. cmd("lrange", key, 0, -1))."""
    return key, lambda pipe: getattr(pipe, name)(key, *args, **kwargs)


def script_call(script: Any, keys: list[str], args: list[object] | None = None) -> Call:
    """A registered script on keys that share one slot (loaded on the node if missing)."""
    return keys[0], lambda pipe: script(keys=keys, args=args or [], client=pipe)


def is_cluster(url: str, mode: str, timeout_s: float, patience_s: float = 0.0) -> bool:
    """`mode` true/false as configured; auto asks the server (INFO cluster), for up to
    `patience_s` while it cannot be reached (a start-up race), then raises the connection error."""
    if mode != "auto":
        return mode == "true"
    deadline = time.monotonic() + patience_s
    while True:
        r = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        try:
            return bool(r.info("cluster").get("cluster_enabled"))
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if time.monotonic() >= deadline:
                raise redis.ConnectionError(
                    f"cannot reach Redis to tell whether it is a Redis Cluster ({exc}); "
                    "set ENCORE_REDIS_CLUSTER=true or false to skip the question"
                ) from exc
            log.warning("Redis not reachable yet to detect cluster mode (%s); retrying", exc)
            time.sleep(1.0)
        finally:
            r.close()


def per_node(rc: RedisCluster, calls: Sequence[Call]) -> list[Any]:
    """Run `calls` grouped by owning node, one pipeline each; results in call order."""
    groups: dict[str, tuple[Any, list[int]]] = {}
    for i, (key, _) in enumerate(calls):
        node = rc.get_node_from_key(key)
        groups.setdefault(node.name, (node, []))[1].append(i)
    out: list[Any] = [None] * len(calls)
    try:
        for node, idx in groups.values():
            pipe = node.redis_connection.pipeline(transaction=False)
            for i in idx:
                calls[i][1](pipe)
            for i, res in zip(idx, pipe.execute(), strict=True):
                out[i] = res
    except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
        refresh(rc)
        raise
    return out


def refresh(rc: RedisCluster) -> None:
    """Re-learn slots and nodes after a failover or reshard (best effort: the retry tells)."""
    try:
        rc.nodes_manager.initialize()
    except Exception as exc:  # noqa: BLE001 - the cluster may still be electing; the step retries
        log.warning("Redis Cluster topology refresh failed (%s); retrying later", exc)


def fixed_bucket_count(rc: RedisCluster, key: str, buckets: int) -> int:
    """The bucket count is part of the key layout: the first writer records it (from
    ENCORE_REDIS_BUCKETS), and everyone after uses the recorded one, readers included."""
    rc.set(key, buckets, nx=True)
    stored = int(rc.get(key) or buckets)
    if stored != buckets:
        log.warning(
            "ENCORE_REDIS_BUCKETS=%d, but the state in this Redis Cluster is laid out in %d buckets: using %d "
            "(a new count needs a fresh key prefix and a replay from Kafka)",
            buckets,
            stored,
            stored,
        )
    return stored
