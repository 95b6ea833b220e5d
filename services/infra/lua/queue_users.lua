-- Queue users for a re-solve in one step (one hash-tag bucket on Redis Cluster).
-- KEYS: 1 pending sequence counter, 2 pending users zset. ARGV: the user ids.
-- Every user gets the same fresh sequence number: a newer change always scores higher.
local seq = redis.call('INCR', KEYS[1])
for s = 1, #ARGV, 1000 do
  local args = {}
  for i = s, math.min(s + 999, #ARGV) do
    args[#args + 1] = seq
    args[#args + 1] = ARGV[i]
  end
  redis.call('ZADD', KEYS[2], unpack(args))
end
return seq
