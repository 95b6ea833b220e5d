-- Apply one batch of impressions and plays to the experiment state, each record at most once.
-- KEYS[1] fence hash: "topic|incarnation|partition" -> last applied offset
-- KEYS[2] metrics hash: "experiment|arm|impressions|converted|plays" counters
-- KEYS[3..] one impressions hash per user: "t:<track>" -> "request|experiment|arm|ts",
--           "r:<request>" -> 1 once that impression was followed by a play
-- ARGV[1] JSON list of records, in the order they apply:
--   {"f": fence field, "o": offset, "k": KEYS index, "i": 1 (impression), "rid", "exp", "arm", "ts", "items"}
--   {"f": fence field, "o": offset, "k": KEYS index, "track", "ts", "n"}             (a play)
--   a play op stands for "n" records of its partition (default 1): itself and the records
--   before it that cannot join (track ""), which only move the fence; counted as plays.
-- ARGV[2] join window in seconds. All keys share one hash tag: one slot on a cluster.
-- Returns {impressions applied, plays applied, plays joined, records skipped as replays}.
local records = cjson.decode(ARGV[1])
local window = tonumber(ARGV[2])
local fences = {}
local applied_i, applied_p, joined, skipped = 0, 0, 0, 0
for _, rec in ipairs(records) do
  local last = fences[rec.f]
  if last == nil then
    last = tonumber(redis.call('HGET', KEYS[1], rec.f) or '-1')
  end
  if rec.o <= last then
    skipped = skipped + (rec.n or 1)
  else
    fences[rec.f] = rec.o
    local user_key = KEYS[rec.k]
    if rec.i == 1 then
      local exp = rec.exp or ''
      local value = rec.rid .. '|' .. exp .. '|' .. rec.arm .. '|' .. string.format('%.3f', rec.ts)
      for _, track in ipairs(rec.items) do
        redis.call('HSET', user_key, 't:' .. track, value)
      end
      redis.call('EXPIRE', user_key, math.ceil(window * 2))
      redis.call('HINCRBY', KEYS[2], exp .. '|' .. rec.arm .. '|impressions', 1)
      applied_i = applied_i + 1
    else
      local shown = rec.track ~= '' and redis.call('HGET', user_key, 't:' .. rec.track)
      if shown then
        local rid, exp, arm, ts = string.match(shown, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
        local age = rec.ts - tonumber(ts)
        if age >= 0 and age <= window then
          redis.call('HINCRBY', KEYS[2], exp .. '|' .. arm .. '|plays', 1)
          if redis.call('HSETNX', user_key, 'r:' .. rid, 1) == 1 then
            redis.call('HINCRBY', KEYS[2], exp .. '|' .. arm .. '|converted', 1)
          end
          joined = joined + 1
        end
      end
      applied_p = applied_p + (rec.n or 1)
    end
  end
end
for field, offset in pairs(fences) do
  redis.call('HSET', KEYS[1], field, offset)
end
return {applied_i, applied_p, joined, skipped}
