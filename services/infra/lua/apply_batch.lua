-- Apply one fold-in micro-batch exactly once: histories, recent listeners, pending work,
-- dead letters and the per-partition applied offsets change together or not at all.
--
-- KEYS: 1 offsets hash, 2 pending sequence counter, 3 dirty users zset, 4 pending users zset,
--       5 new tracks set, 6 forgotten users hash (user -> incarnation|partition|offset of an
--       erase record the fence has not passed), then one dead-letter list per partition range
--       (in ARGV's range order),
--       then one history hash per user of the batch (n_users of them, in ARGV's user order),
--       then one listeners zset per new track of the batch.
-- ARGV: incarnation, history cap, listeners cap,
--       n_ranges, then (partition, first offset, last offset, expected offset) per partition,
--       the user ids as one JSON list (members of the dirty and pending sets),
--       the plays as one flat JSON list: (user no., track, weight, ts, listeners no.) per
--       aggregated (user, track); weight and ts as decimal strings (passed to Redis as sent),
--       user no. is 1-based into the users, listeners no. 1-based into the listener keys or 0
--       for a track the model knows (only unknown tracks keep recent listeners);
--       then (range no., dead letter JSON) per dead letter; range no. is 1-based.
--       Users and plays travel as two JSON arguments, not one argument each: packing tens of
--       thousands of arguments was most of a batch's client time.
-- Applied only if every partition's stored offset lies below the batch's first offset and at or
-- above the offset the caller expects (the last one it applied or read; -1 = no expectation).
-- Otherwise nothing is written and {-1, partition, stored offset, ...} is returned when the batch
-- was already applied (a replay), or {-2, partition, stored offset, ...} when the stored offset
-- went backwards under the caller (Redis lost writes: restored, failed over, flushed), so the
-- caller can rewind its consumer to the stored offset and replay the lost range from Kafka.
-- A user in the forgotten hash whose erase record lies beyond this batch (and the fence) gets
-- none of the batch's plays: they were made before the erasure and reached us after it.
local offsets = KEYS[1]
local inc, hcap, lcap = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local n_ranges = tonumber(ARGV[4])
local r_end = 4 + 4 * n_ranges
local conflict, lost = {}, {}
for i = 5, r_end, 4 do
  local applied = tonumber(redis.call('HGET', offsets, inc .. '|' .. ARGV[i]) or '-1')
  if applied < tonumber(ARGV[i + 3]) then
    lost[#lost + 1] = ARGV[i]
    lost[#lost + 1] = applied
  elseif applied >= tonumber(ARGV[i + 1]) then
    conflict[#conflict + 1] = ARGV[i]
    conflict[#conflict + 1] = applied
  end
end
if #lost > 0 then
  table.insert(lost, 1, -2)
  return lost
end
if #conflict > 0 then
  table.insert(conflict, 1, -1)
  return conflict
end
local seq = redis.call('INCR', KEYS[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local users = cjson.decode(ARGV[r_end + 1])  -- users[j] is user j
local n_users = #users
local rows = cjson.decode(ARGV[r_end + 2])
local n_plays = #rows / 5
local h0 = 6 + n_ranges         -- KEYS[h0 + j] is the history of user j
local l0 = h0 + n_users         -- KEYS[l0 + j] is listeners key j
local blocked = {}
if redis.call('HLEN', KEYS[6]) > 0 then
  for j = 1, n_users do
    local t = redis.call('HGET', KEYS[6], users[j])
    if t then
      local t_inc, t_part, t_off = string.match(t, '^(.*)|(%d+)|(%d+)$')
      if t_inc == inc then
        local reach = tonumber(redis.call('HGET', offsets, inc .. '|' .. t_part) or '-1')
        for i = 5, r_end, 4 do
          if ARGV[i] == t_part then reach = math.max(reach, tonumber(ARGV[i + 2])) end
        end
        if reach < tonumber(t_off) then
          blocked[j] = true
        else
          redis.call('HDEL', KEYS[6], users[j])  -- passed: the record is behind the fence
        end
      end
    end
  end
end
local new, seen = {}, {}
for i = 1, 5 * n_plays, 5 do
  local u, track, lk = rows[i], rows[i + 1], rows[i + 4]
  if not blocked[u] then
    redis.call('HINCRBYFLOAT', KEYS[h0 + u], track, rows[i + 2])
    if lk > 0 then
      redis.call('ZADD', KEYS[l0 + lk], rows[i + 3], users[u])
      if not seen[lk] then
        seen[lk] = true
        new[#new + 1] = track
      end
    end
  end
end
local dirty, pending = {}, {}
for j = 1, n_users do
  local user, hkey = users[j], KEYS[h0 + j]
  if not blocked[j] then
    dirty[#dirty + 1] = now; dirty[#dirty + 1] = user
    pending[#pending + 1] = seq; pending[#pending + 1] = user
    if redis.call('HLEN', hkey) > hcap + math.floor(hcap / 10) then
      local flat = redis.call('HGETALL', hkey)
      local items = {}
      for k = 1, #flat, 2 do items[#items + 1] = {flat[k], tonumber(flat[k + 1])} end
      table.sort(items, function(a, b) return a[2] > b[2] end)
      for k = hcap + 1, #items do redis.call('HDEL', hkey, items[k][1]) end
    end
  end
end
for lk in pairs(seen) do
  redis.call('ZREMRANGEBYRANK', KEYS[l0 + lk], 0, -(lcap + 1))
end
local function chunked(cmd, key, list)
  for s = 1, #list, 1000 do
    redis.call(cmd, key, unpack(list, s, math.min(s + 999, #list)))
  end
end
chunked('ZADD', KEYS[3], dirty)
chunked('ZADD', KEYS[4], pending)
chunked('SADD', KEYS[5], new)
for i = r_end + 3, #ARGV, 2 do
  redis.call('RPUSH', KEYS[6 + tonumber(ARGV[i])], ARGV[i + 1])
end
for i = 5, r_end, 4 do
  redis.call('HSET', offsets, inc .. '|' .. ARGV[i], ARGV[i + 2])
end
return {n_plays}
