"""Redis Cluster plumbing: detection, one pipeline per node, and the bucket-count guard.

redis-py's cluster pipeline refuses scripts (EVALSHA), and the speed layer runs one fenced
script per hash-tag bucket. `per_node` groups such calls by the node that owns each call's
first key and sends every group as one plain pipeline to that node: one round trip per node
per step, never one per user or per bucket. Scripts go as bare EVALSHA: a redis-py pipeline
that runs `Script` objects first asks SCRIPT EXISTS, a second round trip on every call; here a
node that lacks a script (a promoted replica: script caches are not replicated) answers
NOSCRIPT for those calls only, which are then loaded and sent again. A MOVED or ASK reply (a
failover or a reshard moved the slot) or a lost node makes the whole call fail after the
client re-learns the topology; the caller's step is retried whole, which its fences make safe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import redis
from redis.cluster import RedisCluster
from redis.commands.core import Script
from redis.crc import key_slot
from redis.exceptions import NoScriptError

log = logging.getLogger(__name__)


class Call(NamedTuple):
    key: str  # a key the call touches: its slot picks the node
    add: Callable[[Any], object]  # adds the command to a pipeline
    script: Script | None = None  # what to load where the node answers NOSCRIPT


def cmd(name: str, key: str, *args: Any, **kwargs: Any) -> Call:
    """A plain command on `key` (e.g. cmd("lrange", key, 0, -1))."""
    return Call(key, lambda pipe: getattr(pipe, name)(key, *args, **kwargs))


def script_call(script: Script, keys: list[str], args: list[object] | None = None) -> Call:
    """A registered script on keys that share one slot (loaded on the node if missing)."""
    return Call(
        keys[0], lambda pipe: pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *(args or [])), script
    )


def is_cluster(url: str, mode: str, timeout_s: float, patience_s: float = 0.0, **options: Any) -> bool:
    """`mode` true/false as configured; auto asks the server (CLUSTER INFO, which an ACL user
    without @dangerous may run, where INFO is refused), for up to `patience_s` while it cannot be
    reached (a start-up race), then raises the connection error. `options`: TLS and credentials."""
    if mode != "auto":
        return mode == "true"
    deadline = time.monotonic() + patience_s
    while True:
        r = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, **options)
        try:
            r.execute_command("CLUSTER", "INFO")
            return True
        except redis.ResponseError as exc:
            if "cluster support disabled" in str(exc):
                return False
            raise
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if isinstance(exc, redis.AuthenticationError) or time.monotonic() >= deadline:
                raise redis.ConnectionError(
                    f"cannot reach Redis to tell whether it is a Redis Cluster ({exc}); "
                    "set ENCORE_REDIS_CLUSTER=true or false to skip the question"
                ) from exc
            log.warning("Redis not reachable yet to detect cluster mode (%s); retrying", exc)
            time.sleep(1.0)
        finally:
            r.close()


_POOL = ThreadPoolExecutor(max_workers=16, thread_name_prefix="encore-redis-node")


def _on_nodes(groups: Sequence[tuple[Any, Any]], fn: Callable[[Any, Any], Any]) -> list[Any]:
    """fn(node, work) for every (node, work) group, the nodes at once: each master does its
    share in parallel (and the network waits overlap) where a loop would visit them in turn."""
    if len(groups) == 1:
        return [fn(*groups[0])]
    return list(_POOL.map(lambda g: fn(*g), groups))


def per_node(rc: RedisCluster, calls: Sequence[Call]) -> list[Any]:
    """Run `calls` grouped by owning node, one pipeline each; results in call order."""
    groups: dict[str, tuple[Any, list[int]]] = {}
    for i, call in enumerate(calls):
        node = rc.get_node_from_key(call.key)
        groups.setdefault(node.name, (node, []))[1].append(i)

    def send(node: Any, idx: list[int]) -> list[Any]:
        return _pipelined(node.redis_connection, [calls[i] for i in idx])

    out: list[Any] = [None] * len(calls)
    try:
        for (_, idx), results in zip(groups.values(), _on_nodes(list(groups.values()), send), strict=True):
            for i, res in zip(idx, results, strict=True):
                out[i] = res
    except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
        refresh(rc)
        raise
    return out


def _pipelined(conn: redis.Redis, calls: Sequence[Call]) -> list[Any]:
    """One pipeline on one node; the calls it lacks a script for are loaded and sent again
    (a NOSCRIPT reply means the call did not run). Raises the first error reply, as
    `Pipeline.execute` does, once every call has run."""

    def run(batch: Sequence[Call]) -> list[Any]:
        pipe = conn.pipeline(transaction=False)
        for c in batch:
            c.add(pipe)
        return pipe.execute(raise_on_error=False)  # type: ignore[no-any-return]

    results = run(calls)
    missing = [i for i, res in enumerate(results) if isinstance(res, NoScriptError) and calls[i].script]
    if missing:
        for script in {calls[i].script.sha: calls[i].script for i in missing}.values():  # type: ignore[union-attr]
            conn.script_load(script.script)  # type: ignore[union-attr]
        for i, res in zip(missing, run([calls[i] for i in missing]), strict=True):
            results[i] = res
    for res in results:
        if isinstance(res, Exception):
            raise res
    return results


def _by_slot(keys: Sequence[str]) -> dict[int, list[int]]:
    """Key positions grouped by slot. The slot is CRC16 of the hash tag (the key's first
    `{...}`, as the cluster spec hashes it), computed once per tag rather than once per key."""
    slots: dict[int, list[int]] = {}
    memo: dict[str, int] = {}
    for i, k in enumerate(keys):
        lo = k.find("{")
        hi = k.find("}", lo + 1) if lo >= 0 else -1
        tag = k[lo + 1 : hi] if hi > lo + 1 else k
        slot = memo.get(tag)
        if slot is None:
            slot = memo[tag] = key_slot(tag.encode())
        slots.setdefault(slot, []).append(i)
    return slots


def _retrying(rc: RedisCluster, what: str, attempt_fn: Callable[[], Any], attempts: int = 6) -> Any:
    """Idempotent bulk reads and writes: after a MOVED, ASK or lost node the topology is
    re-learnt and the whole call repeated (what redis-py's cluster client does per command)."""
    for attempt in range(attempts):
        try:
            return attempt_fn()
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError, redis.RedisClusterException) as exc:
            refresh(rc)
            if attempt == attempts - 1:
                raise
            log.warning("%s on the cluster failed (%s); topology re-read, trying again", what, exc)
            time.sleep(min(0.25 * 2**attempt, 5.0))
    raise AssertionError("unreachable")


def _slot_groups(rc: RedisCluster, slots: dict[int, list[int]]) -> list[tuple[Any, list[list[int]]]]:
    groups: dict[str, tuple[Any, list[list[int]]]] = {}
    for slot, idx in slots.items():
        node = rc.nodes_manager.get_node_from_slot(slot)
        groups.setdefault(node.name, (node, []))[1].append(idx)
    return list(groups.values())


def mset_per_node(rc: RedisCluster, mapping: Mapping[str, bytes]) -> None:
    """One MSET per slot, one pipeline per node, the nodes at once (redis-py's `mset_nonatomic`
    visits them one by one). For vectors: idempotent, so a failed call is simply repeated."""
    keys, values = list(mapping), list(mapping.values())
    slots = _by_slot(keys)

    def send(node: Any, per_slot: list[list[int]]) -> None:
        pipe = node.redis_connection.pipeline(transaction=False)
        for idx in per_slot:
            pipe.execute_command("MSET", *[a for i in idx for a in (keys[i], values[i])])
        pipe.execute()

    _retrying(rc, "MSET", lambda: _on_nodes(_slot_groups(rc, slots), send))


def mget_per_node(rc: RedisCluster, keys: Sequence[str]) -> list[bytes | None]:
    """MGET of keys in any slots: one per slot, one pipeline per node, the nodes at once."""
    slots = _by_slot(keys)
    out: list[bytes | None] = [None] * len(keys)

    def send(node: Any, per_slot: list[list[int]]) -> None:
        pipe = node.redis_connection.pipeline(transaction=False)
        for idx in per_slot:
            pipe.execute_command("MGET", *[keys[i] for i in idx])
        for idx, values in zip(per_slot, pipe.execute(), strict=True):
            for i, v in zip(idx, values, strict=True):
                out[i] = v

    _retrying(rc, "MGET", lambda: _on_nodes(_slot_groups(rc, slots), send))
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
