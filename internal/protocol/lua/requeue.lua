-- requeue.lua: move one dead letter's item back to the end of its key.
--
-- KEYS[1] items key of the dead letter's key
-- KEYS[2] ready ZSET
-- KEYS[3] wake LIST
-- KEYS[4] dead ZSET
-- KEYS[5] deaddata HASH
-- KEYS[6] count key of the dead letter's key
-- ARGV[1] dead letter id
-- ARGV[2] the item (one JSON value, validated by the caller)
-- ARGV[3] the key, as a member of the ready index
--
-- Returns 1 when requeued, 0 when the dead letter is gone (requeued or purged
-- by someone else). Errors with NOTARRAY, changing nothing, when the key holds
-- something other than a JSON array. Requeueing ignores the key's caps: it
-- puts back an item that was stored before.
if redis.call('HEXISTS', KEYS[5], ARGV[1]) == 0 then
  return 0
end
local _, _, _, err = append_items(KEYS[1], KEYS[6], ARGV[2], 1, 0, 0)
if err then
  return err
end
make_due(KEYS[2], KEYS[3], now_ms(), ARGV[3]) -- due now by the server's clock, as appends
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1])
return 1
