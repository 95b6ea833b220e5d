"""The HistoryStore port on Redis Cluster: one fenced step per hash-tag bucket, pipelined per node.

Exactly once on a sharded keyspace. User u's history lives in bucket b = CRC32(u) mod B, and
each bucket has its own offsets fence (`offsets:{b}:group`, field `incarnation|partition`). A
batch is split by bucket; every bucket's step is the single-node script (`apply_batch.lua`) on
that bucket's keys, so it applies the bucket's share of a partition's offset range at most once,
atomically with its fence. Every step advances its fence over the *whole* batch range, empty
share or not, so all fences move in lockstep and:
- a replay after a crash between two buckets' steps is exact: the buckets that applied the
  range refuse it again (their fence is past it), the others apply it;
- the state's resume offset per partition is the lowest fence over all buckets, + 1;
- a fence below what the worker applied (a failover dropped unreplicated writes on one master)
  is a rewind, exactly as on one node: those partitions are replayed from Kafka and each bucket
  takes only what it lost.
Dead letters of partition p are recorded by bucket p mod B. Recent listeners of new tracks and
the new-tracks set are global keys, written before the fenced steps with idempotent commands
(ZADD GT, SADD), so a repeat is harmless and a crash between cannot lose them.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping

import numpy as np
from redis.cluster import RedisCluster

from core.errors import StateRewoundError
from core.messages import DeadLetter, encode_vectors
from services.infra.cluster_io import Call, cmd, per_node, script_call
from services.infra.keys import Keys
from services.infra.lua import source
from services.speed.history_store import (
    USERS_PER_CALL,
    FencingError,
    TrackListeners,
    apply_args,
    ranges_of,
    stored_offsets,
)
from services.speed.records import PlayRecord, Record

log = logging.getLogger(__name__)
Share = tuple[list[Record], dict[int, tuple[int, int]]]  # a bucket's records and fence ranges


class ClusterHistoryStore(TrackListeners):
    """HistoryStore on Redis Cluster (see `ports.HistoryStore` for the contract)."""

    def __init__(self, r: RedisCluster, keys: Keys, group: str, history_cap: int, listeners_cap: int) -> None:
        if not keys.buckets:
            raise ValueError("ClusterHistoryStore needs Keys with buckets")
        self.r, self.keys, self.group = r, keys, group
        self.caps = (history_cap, listeners_cap)
        self._apply = r.register_script(source("apply_batch"))
        self._histories = r.register_script(source("histories"))
        self._queue = r.register_script(source("queue_users"))
        self._erase = r.register_script(source("erase_user"))
        self._put_vectors = r.register_script(source("put_vectors"))
        self.all = range(keys.buckets)

    # ---- the fenced step ------------------------------------------------------------
    def apply(self, incarnation: str, records: list[Record], expected: Mapping[int, int] | None = None) -> int:
        if not records:
            return 0
        self._listen(records)
        ranges = ranges_of(records)
        todo: dict[int, Share] = {b: ([], dict(ranges)) for b in self.all}
        bucket_of: dict[str, int] = {}  # a user plays several times in a batch: hash once
        for rec in records:
            if isinstance(rec, PlayRecord):
                b = bucket_of.get(rec.user, -1)
                if b < 0:
                    b = bucket_of[rec.user] = self.keys.bucket_of_user(rec.user)
            else:
                b = self.keys.dlq_bucket(rec.partition)
            todo[b][0].append(rec)
        applied = 0
        for _ in range(5):
            order = list(todo)
            calls = []
            for b in order:
                recs, rng = todo[b]
                k, a = apply_args(
                    self.keys.bucket(b), self.group, self.caps, incarnation, recs, expected or {}, rng, False
                )
                calls.append(script_call(self._apply, k, a))
            lost: dict[int, int] = {}
            again: dict[int, Share] = {}
            for b, reply in zip(order, per_node(self.r, calls), strict=True):
                status = int(reply[0])
                if status >= 0:
                    applied += len(todo[b][0])
                elif status == -2:
                    for p, o in stored_offsets(reply).items():
                        lost[p] = min(lost.get(p, o), o)
                else:
                    share = self._unapplied(todo[b], stored_offsets(reply))
                    if share[1]:
                        again[b] = share
            if lost:
                raise StateRewoundError(lost)
            if not again:
                return applied
            log.info("replayed records skipped (already applied) in %d buckets", len(again))
            todo = again
        raise FencingError("offsets kept moving under this worker: another writer owns its partitions")

    @staticmethod
    def _unapplied(share: Share, stored: dict[int, int]) -> Share:
        """What a bucket that refused a replay still lacks: records and ranges past its fence."""
        recs, rng = share
        left = {p: (max(lo, stored.get(p, -1) + 1), hi) for p, (lo, hi) in rng.items() if stored.get(p, -1) < hi}
        return [r for r in recs if r.partition in left and r.offset > stored.get(r.partition, -1)], left

    def _listen(self, records: list[Record]) -> None:
        """Recent listeners of tracks the model does not know, and the new-tracks set."""
        latest: dict[str, dict[str, float]] = {}
        for r in records:
            if isinstance(r, PlayRecord) and r.new_track:
                users = latest.setdefault(r.track, {})
                users[r.user] = max(users.get(r.user, r.ts), r.ts)
        if not latest:
            return
        pipe = self.r.pipeline(transaction=False)
        for track, users in latest.items():
            pipe.zadd(self.keys.listeners(track), users, gt=True)
            pipe.zremrangebyrank(self.keys.listeners(track), 0, -(self.caps[1] + 1))
        pipe.sadd(self.keys.new_tracks, *latest)
        pipe.execute()

    def applied_offsets(self, incarnation: str) -> dict[int, int]:
        """Per partition the lowest fence over all buckets (a bucket without one: -1)."""
        calls = [cmd("hgetall", self.keys.bucket(b).offsets(self.group)) for b in self.all]
        per_bucket: list[dict[int, int]] = []
        for raw in per_node(self.r, calls):
            fences = {}
            for k, v in raw.items():
                inc, part = k.decode().rsplit("|", 1)
                if inc == incarnation:
                    fences[int(part)] = int(v)
            per_bucket.append(fences)
        parts = set().union(*per_bucket) if per_bucket else set()
        return {p: min(f.get(p, -1) for f in per_bucket) for p in parts}

    # ---- reads and work queues ----------------------------------------------------------
    def _by_bucket(self, users: list[str]) -> dict[int, list[int]]:
        """Positions of `users` grouped by bucket: each id hashed once per call."""
        out: dict[int, list[int]] = {}
        for i, u in enumerate(users):
            out.setdefault(self.keys.bucket_of_user(u), []).append(i)
        return out

    def raw_histories(self, users: list[str]) -> list[list[bytes]]:
        calls, slots = [], []
        for b, idx in self._by_bucket(users).items():
            prefix = self.keys.bucket(b).history_prefix
            for s in range(0, len(idx), USERS_PER_CALL):
                chunk = idx[s : s + USERS_PER_CALL]
                calls.append(script_call(self._histories, [prefix + users[i] for i in chunk]))
                slots.append(chunk)
        out: list[list[bytes]] = [[] for _ in users]
        for chunk, rows in zip(slots, per_node(self.r, calls), strict=True):
            for i, row in zip(chunk, rows, strict=True):
                out[i] = row
        return out

    def put_vectors(self, version: str, users: list[str], vectors: np.ndarray) -> set[str]:
        blobs = encode_vectors(vectors)
        by_bucket = self._by_bucket(users)
        calls = []
        for b, idx in by_bucket.items():
            prefix = self.keys.users_in_bucket(version, b)
            keys = [self.keys.bucket(b).pending_users] + [prefix + users[i] for i in idx]
            cut = len(prefix.encode())  # bytes before the user id, as Lua counts
            calls.append(script_call(self._put_vectors, keys, [cut] + [blobs[i] for i in idx]))
        skipped = per_node(self.r, calls) if calls else []
        return {users[idx[int(j) - 1]] for idx, out in zip(by_bucket.values(), skipped, strict=True) for j in out}

    def pending(self, limit: int) -> tuple[list[str], dict[int, float]]:
        """Up to about `limit` users over all buckets, and per bucket the score reached: all
        users at a bucket's cut-off score are included, so `settle` can drop up to it."""
        per = max(1, -(-limit // len(self.all)))
        keys = [self.keys.bucket(b).pending_users for b in self.all]
        rows = per_node(self.r, [cmd("zrange", k, 0, per - 1, withscores=True) for k in keys])
        cut = {b: float(r[-1][1]) for b, r in zip(self.all, rows, strict=True) if r}
        full = [b for b, r in zip(self.all, rows, strict=True) if len(r) == per]
        got = {b: [u for u, _ in r] for b, r in zip(self.all, rows, strict=True) if r}
        if full:
            calls = [cmd("zrangebyscore", keys[b], "-inf", cut[b]) for b in full]
            for b, r in zip(full, per_node(self.r, calls), strict=True):
                got[b] = r
        return [u.decode() for r in got.values() for u in r], cut

    def queue_users(self, users: list[str]) -> None:
        calls = []
        for b, idx in self._by_bucket(users).items():
            bk = self.keys.bucket(b)
            calls.append(script_call(self._queue, [bk.pending_seq, bk.pending_users], [users[i] for i in idx]))
        if calls:
            per_node(self.r, calls)

    def dead_letters(self, partitions: Collection[int]) -> dict[int, list[DeadLetter]]:
        parts = sorted(partitions)
        keys = [self.keys.bucket(self.keys.dlq_bucket(p)).pending_dlq(p) for p in parts]
        rows = per_node(self.r, [cmd("lrange", k, 0, -1) for k in keys]) if parts else []
        return {p: [DeadLetter.from_json(raw) for raw in row] for p, row in zip(parts, rows, strict=True) if row}

    def settle(self, dead_letters: Mapping[int, int], done_upto: Mapping[int, float] | None) -> None:
        calls: list[Call] = []
        for p, n in dead_letters.items():
            if n:
                calls.append(cmd("ltrim", self.keys.bucket(self.keys.dlq_bucket(p)).pending_dlq(p), n, -1))
        for b, upto in (done_upto or {}).items():
            calls.append(cmd("zremrangebyscore", self.keys.bucket(b).pending_users, "-inf", upto))
        if calls:
            per_node(self.r, calls)

    def backlog(self, partitions: Collection[int]) -> tuple[int, int]:
        """(users awaiting a re-solve, dead letters recorded but not yet produced): for status."""
        calls = [cmd("zcard", self.keys.bucket(b).pending_users) for b in self.all]
        calls += [cmd("llen", self.keys.bucket(self.keys.dlq_bucket(p)).pending_dlq(p)) for p in partitions]
        counts = [int(c) for c in per_node(self.r, calls)]
        return sum(counts[: len(self.all)]), sum(counts[len(self.all) :])

    def changed_since(self, t: float) -> list[str]:
        keys = [self.keys.bucket(b).dirty_users for b in self.all]
        rows = per_node(self.r, [cmd("zrangebyscore", k, t, "+inf") for k in keys])
        return [u.decode() for row in rows for u in row]
