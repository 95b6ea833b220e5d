-- Which of KEYS exist: returns their 1-based positions. One call instead of one EXISTS per key
-- (the experiment join asks this for every user of a poll's plays). On a Redis Cluster all
-- KEYS must share one hash tag.
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    out[#out + 1] = i
  end
end
return out
