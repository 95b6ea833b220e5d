-- Every history hash in KEYS as a flat [track, weight, ...] array, one per key, in one call.
local out = {}
for i = 1, #KEYS do out[i] = redis.call('HGETALL', KEYS[i]) end
return out
