-- reap.lua: return the items of one expired lease.
--
-- KEYS[1]  leases ZSET
-- KEYS[2]  leasemeta HASH
-- KEYS[3]  the lease key
-- KEYS[4]  the items key of the lease's key (the lease key again for a batch of retries)
-- KEYS[5]  ready ZSET
-- KEYS[6]  wake LIST
-- KEYS[7]  retry ZSET
-- KEYS[8]  retrydata HASH
-- KEYS[9]  count key of the lease's key
-- KEYS[10] count key of the lease
-- ARGV[1]  lease token
-- ARGV[2]  now (ms)
-- ARGV[3]  the lease's description, as the caller read it from leasemeta
-- ARGV[4]  the lease's key, from that description ("" for retries)
-- ARGV[5]  deadline (ms) to give a lease that cannot be returned yet
-- ARGV[6]  the most (ms) the server's clock may be past ARGV[2]: a reap that
--          waited longer to run (Redis stalled) reaps nothing, since the
--          lease's holder had no chance to renew it meanwhile
--
-- The lease is reaped only if its deadline is still past (it was not
-- extended or settled meanwhile). A drained batch is put back in front of
-- its key's array (its items were appended first), and the key is made
-- ready; a batch of retries goes back to the retry index, due now, with its
-- attempt counts. A batch that cannot be put back yet (the key holds a value
-- that is not an array, or the lease holds one while the key has items) keeps
-- its lease, pushed to ARGV[5], and its key is made ready, so that a worker
-- moves the bad value to dead letters. Returns 1 when reaped, 0 otherwise.
local token, now = ARGV[1], ARGV[2]
if now_ms() - tonumber(now) > tonumber(ARGV[6]) then
  return 0
end
local deadline = redis.call('ZSCORE', KEYS[1], token)
if not deadline or tonumber(deadline) > tonumber(now) then
  return 0
end
local meta = redis.call('HGET', KEYS[2], token)
if meta and meta ~= ARGV[3] then
  return redis.error_reply('ERR batchq: the lease description changed')
end
local kind = meta and string.sub(meta, 1, 1)
if kind == 'r' then
  local kv = redis.call('HGETALL', KEYS[3])
  for i = 1, #kv, 2 do
    redis.call('ZADD', KEYS[7], now, kv[i])
    redis.call('HSET', KEYS[8], kv[i], kv[i + 1])
  end
  redis.call('DEL', KEYS[3])
elseif kind == 'd' and redis.call('EXISTS', KEYS[3]) == 1 then
  local n = tonumber(redis.pcall('GET', KEYS[10])) or 0
  local ok, val = pcall(redis.call, 'GET', KEYS[3])
  -- A lease whose count does not record its length (none at all, say)
  -- holds a value another program wrote: it goes back as it was, without
  -- a count, and is never merged into an array batchq wrote.
  local ours = n > 0 and ok and is_array(val) and select(2, counted(n)) == #val
  if ours and can_prepend(KEYS[4], KEYS[9]) then
    prepend_array(KEYS[4], KEYS[9], val, (counted(n)))
    redis.call('DEL', KEYS[3])
  elseif redis.call('EXISTS', KEYS[4]) == 0 then
    redis.call('RENAME', KEYS[3], KEYS[4])
    if ours then
      redis.call('SET', KEYS[9], n)
    end
  else
    redis.call('ZADD', KEYS[1], 'XX', ARGV[5], token)
    make_due(KEYS[5], KEYS[6], now, ARGV[4])
    return 0
  end
  make_due(KEYS[5], KEYS[6], now, ARGV[4])
elseif meta and kind ~= 'd' then
  return redis.error_reply('ERR batchq: unknown lease kind')
end
-- (Also when there is no description or no lease key: an empty lease left
-- by a drain that found no key.)
redis.call('DEL', KEYS[10])
redis.call('ZREM', KEYS[1], token)
redis.call('HDEL', KEYS[2], token)
return 1
