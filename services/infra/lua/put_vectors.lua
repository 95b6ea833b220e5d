-- Store re-solved user vectors, each only while its user is still queued for a re-solve (one
-- hash-tag bucket on Redis Cluster).
-- KEYS: 1 pending users zset, then one vector key per user. ARGV: the user ids, then their
-- vectors, both in the order of the vector keys.
-- An erasure takes the user off the queue in its own atomic step, so a vector solved from a
-- history read before an erasure (by any worker) is not written back. Returns the positions (1-based)
-- of the users left out: usually none.
local n = #KEYS - 1
local left_out = {}
for i = 1, n do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('SET', KEYS[i + 1], ARGV[n + i])
  else
    left_out[#left_out + 1] = i
  end
end
return left_out
