-- Forget one user (right to erasure), fenced like apply_batch.lua so a replay stays exact.
--
-- KEYS: 1 offsets hash (the fence), 2 forgotten users hash, 3 the user's history,
--       4 pending users zset, 5 dirty users zset, then the user's vector in every kept version.
-- ARGV: incarnation, partition, offset (the erase record's place in `plays`), user id,
--       mode: 'hold' (the erasure was just recorded: block the user's plays until the fence
--       passes the record) or 'reached' (the speed layer is at the record: lift the block).
-- If the fence already passed the record, the erasure was done in order and plays after it
-- may have started a new history: nothing is touched, {0} is returned. Otherwise the history,
-- the queued work and the vectors are deleted and {1, track, ...} (the history's tracks, for
-- the caller to drop the user from their listeners) is returned.
local inc, part, off, user, mode = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local fence = tonumber(redis.call('HGET', KEYS[1], inc .. '|' .. part) or '-1')
if fence >= off then
  redis.call('HDEL', KEYS[2], user)
  return {0}
end
local tracks = redis.call('HKEYS', KEYS[3])
redis.call('DEL', KEYS[3])
redis.call('ZREM', KEYS[4], user)
redis.call('ZREM', KEYS[5], user)
for i = 6, #KEYS do redis.call('DEL', KEYS[i]) end
if mode == 'hold' then
  redis.call('HSET', KEYS[2], user, inc .. '|' .. part .. '|' .. off)
else
  redis.call('HDEL', KEYS[2], user)
end
table.insert(tracks, 1, 1)
return tracks
