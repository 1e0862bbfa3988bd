-- requeue.lua: move one dead letter's item back to the end of its key
-- (docs/PROTOCOL.md, "Dead letters").
--
-- KEYS[1] items key of the dead letter's key
-- KEYS[2] count key of the dead letter's key
-- KEYS[3] ready ZSET
-- KEYS[4] later ZSET
-- KEYS[5] wake LIST
-- KEYS[6] dead ZSET
-- KEYS[7] deaddata HASH
-- ARGV[1] dead letter id
-- ARGV[2] the item after a comma and before a closing bracket (",item]";
--         one JSON value, validated by the caller)
-- ARGV[3] the key, as a member of the indexes
--
-- Returns 1 when requeued, 0 when the dead letter is gone (requeued or purged
-- by someone else). Errors with NOTARRAY, changing nothing, when the key holds
-- something other than batchq's array, and with Redis' OOM reply, changing
-- nothing, when Redis is out of memory (see merge_key). Requeueing ignores
-- the key's caps: it puts back an item that was stored before. The key is
-- due at once, by the server's clock.
if redis.call('HEXISTS', KEYS[7], ARGV[1]) == 0 then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local err = merge_key(KEYS[1], KEYS[2], nil, KEYS[3], KEYS[4], KEYS[5], ARGV[3], ARGV[2], 1, 0, 0, now, 0, 0, 0, 0)
if err then
  return err
end
make_due(KEYS[3], KEYS[4], KEYS[5], now, ARGV[3])
redis.call('ZREM', KEYS[6], ARGV[1])
redis.call('HDEL', KEYS[7], ARGV[1])
return 1
