-- Store re-solved user vectors, each only while its user is still queued for a re-solve (one
-- hash-tag bucket on Redis Cluster).
-- KEYS: 1 pending users zset, then one vector key per user.
-- ARGV: 1 the length of the vector keys' common part before the user id, then the vectors in
--       the order of the keys.
-- An erasure takes the user off the queue in its own atomic step (erase_user.lua), so a vector
-- solved from a history read before an erasure, by any worker, is not written back. One
-- ZMSCORE and one MSET per 1,000 users (a ZSCORE and a SET per user cost three times as much);
-- the user ids are cut from the keys rather than sent twice.
-- Returns the positions (1-based) of the users left out: usually none.
local n = #KEYS - 1
local cut = tonumber(ARGV[1])
local left_out = {}
for s = 1, n, 1000 do
  local e = math.min(s + 999, n)
  local users = {}
  for i = s, e do users[#users + 1] = string.sub(KEYS[i + 1], cut + 1) end
  local scores = redis.call('ZMSCORE', KEYS[1], unpack(users))
  local pairs = {}
  for i = s, e do
    if scores[i - s + 1] then
      pairs[#pairs + 1] = KEYS[i + 1]
      pairs[#pairs + 1] = ARGV[i + 1]
    else
      left_out[#left_out + 1] = i
    end
  end
  if #pairs > 0 then redis.call('MSET', unpack(pairs)) end
end
return left_out
