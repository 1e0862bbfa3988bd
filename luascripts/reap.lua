-- reap.lua: return the items of expired leases of one queue shard.
--
-- KEYS[1] leases ZSET
-- KEYS[2] leasemeta HASH
-- KEYS[3] ready ZSET
-- KEYS[4] wake LIST
-- KEYS[5] retry ZSET
-- KEYS[6] retrydata HASH
-- ARGV[1] now (ms)
-- ARGV[2] max leases to reap
-- ARGV[3] prefix of lease keys  (<prefix>:{q:s}:lease:); the token follows
-- ARGV[4] prefix of items keys  (<prefix>:{q:s}:k:); the key follows
-- ARGV[5] deadline (ms) to give a lease that cannot be returned yet
--
-- Lease and items keys are built from ARGV[3] and ARGV[4] and the stored
-- token and key; they share the hash tag of KEYS, so they live in the same
-- slot. A drained batch is put back in front of its key's array (its items
-- were appended first), and the key is made ready; a retry batch goes back to
-- the retry index, due now, with its attempt counts. A batch whose key now
-- holds something that is not an array keeps its lease, pushed to ARGV[5],
-- until a worker has moved the bad value to dead letters.
--
-- Returns the number of leases reaped.
local now = ARGV[1]
local toks = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local reaped = 0
for _, tok in ipairs(toks) do
  local meta = redis.call('HGET', KEYS[2], tok)
  local lk = ARGV[3] .. tok
  local done = true
  if meta == 'r' then
    local kv = redis.call('HGETALL', lk)
    for i = 1, #kv, 2 do
      redis.call('ZADD', KEYS[5], now, kv[i])
      redis.call('HSET', KEYS[6], kv[i], kv[i + 1])
    end
    redis.call('DEL', lk)
  elseif meta and string.sub(meta, 1, 2) == 'd:' and redis.call('EXISTS', lk) == 1 then
    local key = string.sub(meta, 3)
    local ik = ARGV[4] .. key
    local ok, val = pcall(redis.call, 'GET', lk)
    if ok and is_array(val) then
      done = prepend_array(ik, val)
      if done then redis.call('DEL', lk) end
    elseif redis.call('EXISTS', ik) == 0 then
      redis.call('RENAME', lk, ik)
    else
      done = false
    end
    make_ready(KEYS[3], KEYS[4], now, key)
  end
  if done then
    redis.call('ZREM', KEYS[1], tok)
    redis.call('HDEL', KEYS[2], tok)
    reaped = reaped + 1
  else
    redis.call('ZADD', KEYS[1], 'XX', ARGV[5], tok)
  end
end
return reaped
