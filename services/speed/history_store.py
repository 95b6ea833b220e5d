"""Play histories in Redis, applied exactly once: offsets fenced in the same Lua step.

The batch is aggregated per (user, track) before it reaches Redis; `apply_batch.lua` writes it
only if every partition's stored offset lies below the batch's first offset for that partition,
and otherwise writes nothing and returns the stored offsets, so the caller drops what was
already applied and retries: a replay after a crash never counts a play twice. If a stored
offset lies below what the caller expects, Redis lost writes; nothing is written and
`StateRewoundError` tells the caller where to replay from: lost state is never skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import orjson
import redis

from core.errors import StateRewoundError
from core.messages import DeadLetter, encode_vectors
from services.infra.keys import BucketKeys, Keys
from services.infra.lua import source
from services.speed.records import DeadRecord, PlayRecord, Record

log = logging.getLogger(__name__)
USERS_PER_CALL = 5000  # users per script call, histories read or vectors written: a bound on its arguments


def ranges_of(records: list[Record]) -> dict[int, tuple[int, int]]:
    out: dict[int, tuple[int, int]] = {}
    for r in records:
        lo, hi = out.get(r.partition, (r.offset, r.offset))
        out[r.partition] = (min(lo, r.offset), max(hi, r.offset))
    return out


def apply_args(
    k: Keys | BucketKeys,
    group: str,
    caps: tuple[int, int],
    incarnation: str,
    records: list[Record],
    expected: Mapping[int, int],
    ranges: Mapping[int, tuple[int, int]] | None = None,
    listeners: bool = True,
) -> tuple[list[str], list[object]]:
    """KEYS and ARGV of apply_batch.lua (its header documents the layout). `ranges` (default:
    the records' own) is what the step advances the fence over; `listeners` False leaves new
    tracks' listeners to the caller (Redis Cluster keeps them outside the bucket's slot)."""
    ranges = dict(ranges) if ranges is not None else ranges_of(records)
    plays: dict[tuple[str, str], list[Any]] = {}
    dead: list[tuple[int, str]] = []
    for rec in records:
        if isinstance(rec, PlayRecord):
            agg = plays.get((rec.user, rec.track))
            if agg is None:
                plays[(rec.user, rec.track)] = [rec.weight, rec.ts, rec.new_track and listeners]
            else:
                agg[0] += rec.weight
                agg[1] = max(agg[1], rec.ts)
        elif isinstance(rec, DeadRecord):
            dead.append((rec.partition, rec.letter.to_json()))
    users: dict[str, int] = {}
    tracks: dict[str, int] = {}
    rows: list[object] = []
    for (user, track), (w, ts, new) in plays.items():
        u = users.setdefault(user, len(users) + 1)
        lk = tracks.setdefault(track, len(tracks) + 1) if new else 0
        rows += [u, track, repr(w), repr(ts), lk]
    keys = [k.offsets(group), k.pending_seq, k.dirty_users, k.pending_users, k.new_tracks, k.forgotten]
    keys += [k.pending_dlq(p) for p in ranges]
    keys += [k.history(u) for u in users]
    keys += [k.listeners(t) for t in tracks]
    argv: list[object] = [incarnation, caps[0], caps[1], len(ranges)]
    for part, (lo, hi) in ranges.items():
        argv += [part, lo, hi, expected.get(part, -1)]
    argv.append(orjson.dumps(list(users)))
    argv.append(orjson.dumps(rows))
    range_no = {p: i + 1 for i, p in enumerate(ranges)}
    letters: list[object] = []
    for part, letter in dead:
        letters += [range_no[part], letter]
    return keys, argv + letters


def stored_offsets(reply: list[Any]) -> dict[int, int]:
    """The {partition: stored offset} pairs of a refused apply_batch.lua reply."""
    return {int(reply[i]): int(reply[i + 1]) for i in range(1, len(reply), 2)}


class FencingError(RuntimeError):
    """Offsets kept moving under this worker: another writer applies its partitions."""


class TrackListeners:
    """New tracks and their recent listeners: untagged keys read the same way on one Redis and
    on a cluster (single-key commands, a non-transactional pipeline); and the erasure of a user,
    one script in the user's slot on either."""

    r: Any
    keys: Keys
    group: str
    _erase: Any

    def new_tracks(self) -> list[str]:
        return [t.decode() for t in self.r.smembers(self.keys.new_tracks)]

    def forget_new_tracks(self, tracks: list[str]) -> None:
        if tracks:
            self.r.srem(self.keys.new_tracks, *tracks)

    def listener_weights(self, track: str) -> tuple[list[str], list[float]]:
        listeners = [u.decode() for u in self.r.zrange(self.keys.listeners(track), 0, -1)]
        pipe = self.r.pipeline(transaction=False)
        for u in listeners:
            pipe.hget(self.keys.history(u), track)
        weights = [float(w) if w is not None else 0.0 for w in pipe.execute()] if listeners else []
        return listeners, weights

    def drop_listener(self, user: str, tracks: list[str]) -> None:
        """Remove `user` from the recent listeners of `tracks` and of every new track."""
        pipe = self.r.pipeline(transaction=False)
        for track in set(tracks) | set(self.new_tracks()):
            pipe.zrem(self.keys.listeners(track), user)
        pipe.execute()

    def erase_keys(self, user: str, versions: Collection[str]) -> list[str]:
        """KEYS of erase_user.lua for `user` (see its header)."""
        k = self.keys.bucket(self.keys.bucket_of_user(user)) if self.keys.buckets else self.keys
        fence = k.offsets(self.group)
        return [fence, k.forgotten, k.history(user), k.pending_users, k.dirty_users] + [
            self.keys.user(v, user) for v in versions
        ]

    def erase(
        self, incarnation: str, partition: int, offset: int, user: str, versions: Collection[str], hold: bool
    ) -> bool:
        """Forget `user` unless the fence already passed their erase record at (partition, offset):
        history, queued work, vectors in `versions`, listener entries. `hold` keeps their plays
        out until the fence passes the record (the erasure was recorded ahead of the speed layer)."""
        args = [incarnation, partition, offset, user, "hold" if hold else "reached"]
        reply = self._erase(self.erase_keys(user, versions), args)
        if int(reply[0]) == 0:
            return False
        self.drop_listener(user, [t.decode() for t in reply[1:]])
        return True


class RedisHistoryStore(TrackListeners):
    """The HistoryStore port on one Redis (see `ports.HistoryStore` for the contract)."""

    def __init__(self, r: redis.Redis, keys: Keys, group: str, history_cap: int, listeners_cap: int) -> None:
        self.r, self.keys, self.group = r, keys, group
        self.history_cap, self.listeners_cap = history_cap, listeners_cap
        self._apply = r.register_script(source("apply_batch"))
        self._histories = r.register_script(source("histories"))
        self._erase = r.register_script(source("erase_user"))
        self._put_vectors = r.register_script(source("put_vectors"))

    def apply(self, incarnation: str, records: list[Record], expected: Mapping[int, int] | None = None) -> int:
        for _ in range(5):
            if not records:
                return 0
            keys, args = apply_args(
                self.keys, self.group, (self.history_cap, self.listeners_cap), incarnation, records, expected or {}
            )
            reply = self._apply(keys, args)
            status = int(reply[0])
            if status >= 0:
                return len(records)
            stored = stored_offsets(reply)
            if status == -2:
                raise StateRewoundError(stored)
            kept = [r for r in records if r.offset > stored.get(r.partition, -1)]
            log.info(
                "replayed records skipped (already applied): %d; stored offsets %s, batch ranges %s",
                len(records) - len(kept),
                stored,
                ranges_of(records),
            )
            records = kept
        raise FencingError("offsets kept moving under this worker: another writer owns its partitions")

    def applied_offsets(self, incarnation: str) -> dict[int, int]:
        raw = self.r.hgetall(self.keys.offsets(self.group))
        out = {}
        for k, v in raw.items():
            inc, part = k.decode().rsplit("|", 1)
            if inc == incarnation:
                out[int(part)] = int(v)
        return out

    def raw_histories(self, users: list[str]) -> list[list[bytes]]:
        out: list[list[bytes]] = []
        for s in range(0, len(users), USERS_PER_CALL):
            out += self._histories(keys=[self.keys.history(u) for u in users[s : s + USERS_PER_CALL]])
        return out

    def put_vectors(self, version: str, users: list[str], vectors: np.ndarray) -> set[str]:
        left_out: set[str] = set()
        cut = len(self.keys.user(version, "").encode())  # bytes, as Lua counts
        for s in range(0, len(users), USERS_PER_CALL):
            chunk = users[s : s + USERS_PER_CALL]
            keys = [self.keys.pending_users] + [self.keys.user(version, u) for u in chunk]
            skipped = self._put_vectors(keys, [cut, *encode_vectors(vectors[s : s + len(chunk)])])
            left_out.update(chunk[int(i) - 1] for i in skipped)
        return left_out

    def pending(self, limit: int) -> tuple[list[str], float]:
        """All users at the cut-off score are included (a batch is never split), so `settle`
        can drop everything up to that score: anything queued later has a higher score."""
        rows = self.r.zrange(self.keys.pending_users, 0, limit - 1)
        if not rows:
            return [], 0.0
        upto = float(self.r.zscore(self.keys.pending_users, rows[-1]) or 0.0)
        if len(rows) == limit:
            rows = self.r.zrangebyscore(self.keys.pending_users, "-inf", upto)
        return [u.decode() for u in rows], upto

    def queue_users(self, users: list[str]) -> None:
        if users:
            seq = self.r.incr(self.keys.pending_seq)
            self.r.zadd(self.keys.pending_users, dict.fromkeys(users, seq))

    def dead_letters(self, partitions: Collection[int]) -> dict[int, list[DeadLetter]]:
        parts = sorted(partitions)
        pipe = self.r.pipeline(transaction=False)
        for p in parts:
            pipe.lrange(self.keys.pending_dlq(p), 0, -1)
        rows = pipe.execute() if parts else []
        return {p: [DeadLetter.from_json(raw) for raw in row] for p, row in zip(parts, rows, strict=True) if row}

    def settle(self, dead_letters: Mapping[int, int], done_upto: float | None) -> None:
        if not any(dead_letters.values()) and done_upto is None:
            return
        pipe = self.r.pipeline(transaction=False)
        for p, n in dead_letters.items():
            if n:
                pipe.ltrim(self.keys.pending_dlq(p), n, -1)
        if done_upto is not None:
            pipe.zremrangebyscore(self.keys.pending_users, "-inf", done_upto)
        pipe.execute()

    def backlog(self, partitions: Collection[int]) -> tuple[int, int]:
        """(users awaiting a re-solve, dead letters recorded but not yet produced): for status."""
        pipe = self.r.pipeline(transaction=False)
        pipe.zcard(self.keys.pending_users)
        for p in partitions:
            pipe.llen(self.keys.pending_dlq(p))
        counts = pipe.execute()
        return int(counts[0]), sum(int(c) for c in counts[1:])

    def changed_since(self, t: float) -> list[str]:
        return [u.decode() for u in self.r.zrangebyscore(self.keys.dirty_users, t, "+inf")]
