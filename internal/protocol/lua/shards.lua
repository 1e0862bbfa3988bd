-- shards.lua: raise the shard count of a queue in the registry
-- (docs/PROTOCOL.md, "Shards").
--
-- KEYS[1] the registry HASH  <prefix>:queues (queue -> shards)
-- KEYS[2] the grown HASH  <prefix>:grown:{<prefix>:queues} (queue -> the
--         counts it had before), where the count replaced is added
-- ARGV[1] the queue
-- ARGV[2] the new shard count
--
-- Returns the count it replaced (0 for a value that is not a count of 1
-- to 1024, written by another program, which it replaces). Errors with
-- NOQUEUE when the registry does not hold the queue, and with SHRINK
-- <count> when the new count is below the recorded one: a key's items may
-- sit in any shard below the recorded count, and workers drain only the
-- shards below the count, so lowering it could strand items. Equal counts
-- change nothing.
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then
  return redis.error_reply('NOQUEUE')
end
local cur = 0
if string.match(v, '^[1-9]%d?%d?%d?$') and tonumber(v) <= 1024 then
  cur = tonumber(v)
end
local n = tonumber(ARGV[2])
if n < cur then
  return redis.error_reply('SHRINK ' .. cur)
end
if n > cur then
  redis.call('HSET', KEYS[1], ARGV[1], n)
  if cur > 0 then
    grew(KEYS[2], ARGV[1], cur)
  end
end
return cur
