"""Play histories in Redis, applied exactly once: offsets fenced in the same Lua step."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import redis

from services.keys import Keys

# KEYS: none (single-node Redis; keys are built from the prefix in ARGV[1]).
# ARGV: prefix, group, incarnation, history_cap, listeners_cap,
#   n_ranges, then (partition, first offset, last offset) per partition in the batch,
#   n_plays, then (user, track, weight, ts, new) per (user, track) aggregated over the batch,
#   where new = 'new' marks a track unknown to the model (only those keep recent listeners),
#   then the dead-letter JSON documents.
# The batch is applied only if every partition's applied offset is below its first offset;
# otherwise nothing is written and {-1, partition, applied, ...} is returned so the caller
# can drop what was already applied and retry. Histories, listeners, pending work, dead
# letters and the new offsets change in this one script, so a replay never counts twice.
_APPLY = """
local prefix, group, inc = ARGV[1], ARGV[2], ARGV[3]
local hcap, lcap = tonumber(ARGV[4]), tonumber(ARGV[5])
local okey = prefix .. 'offsets:' .. group
local n_ranges = tonumber(ARGV[6])
local conflict = {}
for i = 7, 6 + 3 * n_ranges, 3 do
  local applied = tonumber(redis.call('HGET', okey, inc .. '|' .. ARGV[i]) or '-1')
  if applied >= tonumber(ARGV[i + 1]) then
    conflict[#conflict + 1] = ARGV[i]
    conflict[#conflict + 1] = applied
  end
end
if #conflict > 0 then
  table.insert(conflict, 1, -1)
  return conflict
end
local seq = redis.call('INCR', prefix .. 'foldin:seq')
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local p0 = 7 + 3 * n_ranges
local n_plays = tonumber(ARGV[p0])
local users, tracks, new = {}, {}, {}
for i = p0 + 1, p0 + 5 * n_plays, 5 do
  local user, track = ARGV[i], ARGV[i + 1]
  redis.call('HINCRBYFLOAT', prefix .. 'plays:user:' .. user, track, ARGV[i + 2])
  users[user] = true
  if ARGV[i + 4] == 'new' then
    redis.call('ZADD', prefix .. 'listeners:track:' .. track, ARGV[i + 3], user)
    if not tracks[track] then new[#new + 1] = track end
    tracks[track] = true
  end
end
local dirty, pending = {}, {}
for user in pairs(users) do
  dirty[#dirty + 1] = now; dirty[#dirty + 1] = user
  pending[#pending + 1] = seq; pending[#pending + 1] = user
  local hkey = prefix .. 'plays:user:' .. user
  if redis.call('HLEN', hkey) > hcap + math.floor(hcap / 10) then
    local flat = redis.call('HGETALL', hkey)
    local items = {}
    for j = 1, #flat, 2 do items[#items + 1] = {flat[j], tonumber(flat[j + 1])} end
    table.sort(items, function(a, b) return a[2] > b[2] end)
    for j = hcap + 1, #items do redis.call('HDEL', hkey, items[j][1]) end
  end
end
for track in pairs(tracks) do
  redis.call('ZREMRANGEBYRANK', prefix .. 'listeners:track:' .. track, 0, -(lcap + 1))
end
local function chunked(cmd, key, list)
  for s = 1, #list, 1000 do
    redis.call(cmd, key, unpack(list, s, math.min(s + 999, #list)))
  end
end
chunked('ZADD', prefix .. 'dirty:users', dirty)
chunked('ZADD', prefix .. 'foldin:pending', pending)
chunked('SADD', prefix .. 'tracks:new', new)
local dlq = {}
for i = p0 + 1 + 5 * n_plays, #ARGV do dlq[#dlq + 1] = ARGV[i] end
chunked('RPUSH', prefix .. 'foldin:dlq', dlq)
for i = 7, 6 + 3 * n_ranges, 3 do
  redis.call('HSET', okey, inc .. '|' .. ARGV[i], ARGV[i + 2])
end
return {n_plays}
"""

# Every history of the users in ARGV (after the prefix), as flat [track, weight, ...] arrays.
_HISTORIES = """
local out = {}
for i = 2, #ARGV do out[i - 1] = redis.call('HGETALL', ARGV[1] .. 'plays:user:' .. ARGV[i]) end
return out
"""

# Every history of the users in ARGV (after the prefix), as flat [track, weight, ...] arrays.
_HISTORIES = """
local out = {}
for i = 2, #ARGV do out[i - 1] = redis.call('HGETALL', ARGV[1] .. 'plays:user:' .. ARGV[i]) end
return out
"""

# Remove users from the pending set only if no newer change re-queued them meanwhile.
_DONE = """
local n = 0
for i = 2, #ARGV, 2 do
  local s = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if s and tonumber(s) <= tonumber(ARGV[i + 1]) then
    redis.call('ZREM', KEYS[1], ARGV[i]); n = n + 1
  end
end
return n
"""


class Record(NamedTuple):
    """One consumed message reduced to what the store applies (a tuple: built per event)."""

    partition: int
    offset: int
    kind: str  # 'p' play with weight, 'n' no-op (skip, private), 'd' dead letter
    user: str = ""
    track: str = ""
    weight: float = 0.0
    ts: float = 0.0
    extra: str = ""  # 'new' for a track unknown to the model; the dead letter JSON for 'd'


def dead_letter_json(raw: bytes, reason: str, source: str) -> str:
    return json.dumps({"raw": raw.decode("latin-1"), "error": reason, "source": source})


class HistoryStore:
    """Applies batches atomically and hands out pending fold-in work."""

    def __init__(self, r: redis.Redis, keys: Keys, group: str, history_cap: int, listeners_cap: int) -> None:
        self.r, self.keys, self.group = r, keys, group
        self.history_cap, self.listeners_cap = history_cap, listeners_cap
        self._apply = r.register_script(_APPLY)
        self._histories = r.register_script(_HISTORIES)

    def apply(self, incarnation: str, records: list[Record]) -> int:
        """Apply records not yet applied for their partition; returns how many were new."""
        for _ in range(5):
            if not records:
                return 0
            reply = self._apply(args=self._argv(incarnation, records))
            if int(reply[0]) != -1:
                return len(records)
            applied = {int(reply[i]): int(reply[i + 1]) for i in range(1, len(reply), 2)}
            records = [r for r in records if r.offset > applied.get(r.partition, -1)]
        raise RuntimeError("offsets kept moving under this worker: another writer owns its partitions")

    def _argv(self, incarnation: str, records: list[Record]) -> list[object]:
        ranges: dict[int, list[int]] = {}
        plays: dict[tuple[str, str], list[Any]] = {}
        dead: list[str] = []
        for rec in records:
            lo_hi = ranges.setdefault(rec.partition, [rec.offset, rec.offset])
            lo_hi[0], lo_hi[1] = min(lo_hi[0], rec.offset), max(lo_hi[1], rec.offset)
            if rec.kind == "p":
                agg = plays.get((rec.user, rec.track))
                if agg is None:
                    plays[(rec.user, rec.track)] = [rec.weight, rec.ts, rec.extra]
                else:
                    agg[0] += rec.weight
                    agg[1] = max(agg[1], rec.ts)
            elif rec.kind == "d":
                dead.append(rec.extra)
        argv: list[object] = [self.keys.prefix, self.group, incarnation, self.history_cap, self.listeners_cap]
        argv.append(len(ranges))
        for part, (lo, hi) in ranges.items():
            argv += [part, lo, hi]
        argv.append(len(plays))
        for (user, track), (w, ts, new) in plays.items():
            argv += [user, track, repr(w), repr(ts), new]
        return argv + dead

    def applied_offsets(self, incarnation: str) -> dict[int, int]:
        raw = self.r.hgetall(self.keys.offsets(self.group))
        out = {}
        for k, v in raw.items():
            inc, part = k.decode().rsplit("|", 1)
            if inc == incarnation:
                out[int(part)] = int(v)
        return out

    def pending(self, limit: int) -> tuple[list[str], float]:
        """Users waiting for a re-solve, oldest first, and the score up to which they were taken.

        All users at the cut-off score are included (a batch is never split), so `mark_done`
        can drop everything up to that score: anything queued later has a higher score.
        """
        rows = self.r.zrange(self.keys.pending_users, 0, limit - 1)
        if not rows:
            return [], 0.0
        upto = float(self.r.zscore(self.keys.pending_users, rows[-1]) or 0.0)
        if len(rows) == limit:
            rows = self.r.zrangebyscore(self.keys.pending_users, "-inf", upto)
        return [u.decode() for u in rows], upto

    def mark_done(self, upto: float, pipe: Any = None) -> None:
        """Forget pending users queued at or before score `upto` (they have been re-solved).

        With `pipe` (a redis-py pipeline) the command is only queued on it.
        """
        (pipe if pipe is not None else self.r).zremrangebyscore(self.keys.pending_users, "-inf", upto)

    def queue_users(self, users: list[str]) -> None:
        if users:
            seq = self.r.incr(f"{self.keys.prefix}foldin:seq")
            self.r.zadd(self.keys.pending_users, dict.fromkeys(users, seq))

    def raw_histories(self, users: list[str]) -> list[list[bytes]]:
        """Flat [track, weight, track, weight, ...] replies, one per user, in one round trip."""
        out: list[list[bytes]] = []
        for s in range(0, len(users), 5000):
            out += self._histories(args=[self.keys.prefix, *users[s : s + 5000]])
        return out
