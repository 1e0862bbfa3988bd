-- register.lua: record queues in the registry of a prefix.
--
-- KEYS[1] the registry HASH  <prefix>:queues (queue -> shards)
-- ARGV[1] the shard count of the caller
-- ARGV[2..] queue names
--
-- Each queue keeps the largest shard count any producer or worker recorded
-- for it, so the inspector reads every shard that may hold items even when
-- two processes disagree. Returns the recorded counts, in the order of the
-- queues.
local n = tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV do
  local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[i])) or 0
  if cur < n then
    redis.call('HSET', KEYS[1], ARGV[i], n)
    cur = n
  end
  out[i - 1] = cur
end
return out
