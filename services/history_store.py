"""Play histories in Redis, applied exactly once: offsets fenced in the same Lua step."""

from __future__ import annotations

import json
from dataclasses import dataclass

import redis

from services.keys import Keys

# KEYS: none (single-node Redis; keys are built from the prefix in ARGV[1]).
# ARGV: prefix, group, incarnation, history_cap, listeners_cap, then 8 fields per record:
#   partition, offset, kind ('p' play | 'n' no-op | 'd' dead letter), user, track, weight, ts, extra
# A record at or below its partition's applied offset is skipped; everything else is applied
# and the offsets advanced in the same script, so a replay never counts twice.
_APPLY = """
local prefix, group, inc = ARGV[1], ARGV[2], ARGV[3]
local hcap, lcap = tonumber(ARGV[4]), tonumber(ARGV[5])
local okey = prefix .. 'offsets:' .. group
local applied, newest = {}, {}
local seq = redis.call('INCR', prefix .. 'foldin:seq')
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local n = 0
for i = 6, #ARGV, 8 do
  local part, off, kind = ARGV[i], tonumber(ARGV[i+1]), ARGV[i+2]
  local field = inc .. '|' .. part
  if applied[field] == nil then
    applied[field] = tonumber(redis.call('HGET', okey, field) or '-1')
  end
  if off > applied[field] and off > (newest[field] or -1) then
    newest[field] = off
    n = n + 1
    if kind == 'p' then
      local user, track, w, ts = ARGV[i+3], ARGV[i+4], ARGV[i+5], ARGV[i+6]
      local hkey = prefix .. 'plays:user:' .. user
      redis.call('HINCRBYFLOAT', hkey, track, w)
      local lkey = prefix .. 'listeners:track:' .. track
      redis.call('ZADD', lkey, ts, user)
      redis.call('ZREMRANGEBYRANK', lkey, 0, -(lcap + 1))
      redis.call('ZADD', prefix .. 'dirty:users', now, user)
      redis.call('ZADD', prefix .. 'foldin:pending', seq, user)
      if ARGV[i+7] == 'new' then redis.call('SADD', prefix .. 'tracks:new', track) end
      if redis.call('HLEN', hkey) > hcap + math.floor(hcap / 10) then
        local flat = redis.call('HGETALL', hkey)
        local items = {}
        for j = 1, #flat, 2 do items[#items + 1] = {flat[j], tonumber(flat[j + 1])} end
        table.sort(items, function(a, b) return a[2] > b[2] end)
        for j = hcap + 1, #items do redis.call('HDEL', hkey, items[j][1]) end
      end
    elseif kind == 'd' then
      redis.call('RPUSH', prefix .. 'foldin:dlq', ARGV[i+7])
    end
  end
end
for field, off in pairs(newest) do redis.call('HSET', okey, field, off) end
return n
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


@dataclass(frozen=True)
class Record:
    """One consumed message reduced to what the store applies."""

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
        self._done = r.register_script(_DONE)

    def apply(self, incarnation: str, records: list[Record]) -> int:
        """Apply records not yet applied for their partition; returns how many were new."""
        if not records:
            return 0
        argv: list[object] = [self.keys.prefix, self.group, incarnation, self.history_cap, self.listeners_cap]
        for rec in records:
            argv += [
                rec.partition,
                rec.offset,
                rec.kind,
                rec.user,
                rec.track,
                repr(rec.weight),
                repr(rec.ts),
                rec.extra,
            ]
        return int(self._apply(args=argv))

    def applied_offsets(self, incarnation: str) -> dict[int, int]:
        raw = self.r.hgetall(self.keys.offsets(self.group))
        out = {}
        for k, v in raw.items():
            inc, part = k.decode().rsplit("|", 1)
            if inc == incarnation:
                out[int(part)] = int(v)
        return out

    def pending(self, limit: int) -> list[tuple[str, float]]:
        rows = self.r.zrange(self.keys.pending_users, 0, limit - 1, withscores=True)
        return [(u.decode(), s) for u, s in rows]

    def mark_done(self, users: list[tuple[str, float]]) -> int:
        if not users:
            return 0
        argv: list[object] = [0]
        for u, s in users:
            argv += [u, repr(s)]
        return int(self._done(keys=[self.keys.pending_users], args=argv))

    def queue_users(self, users: list[str]) -> None:
        if users:
            seq = self.r.incr(f"{self.keys.prefix}foldin:seq")
            self.r.zadd(self.keys.pending_users, dict.fromkeys(users, seq))

    def histories(self, users: list[str]) -> list[dict[str, float]]:
        pipe = self.r.pipeline(transaction=False)
        for u in users:
            pipe.hgetall(self.keys.history(u))
        return [{k.decode(): float(v) for k, v in h.items()} for h in pipe.execute()]
