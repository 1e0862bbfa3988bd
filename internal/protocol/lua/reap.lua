-- reap.lua: return the items of one expired lease (docs/PROTOCOL.md,
-- "Reap").
--
-- KEYS[1]  leases ZSET
-- KEYS[2]  the lease key
-- KEYS[3]  the items key of the lease's key (the lease key again for a batch of retries)
-- KEYS[4]  count key of the lease's key (the lease's count key again for retries)
-- KEYS[5]  count key of the lease
-- KEYS[6]  ready ZSET
-- KEYS[7]  later ZSET
-- KEYS[8]  wake LIST
-- KEYS[9]  retry ZSET
-- KEYS[10] retrydata HASH
-- KEYS[11] the hold of the lease's key (the lease key again for retries)
-- ARGV[1]  the lease, as a member of the leases index
-- ARGV[2]  now (ms)
-- ARGV[3]  the lease's key ("" for a batch of retries)
-- ARGV[4]  deadline (ms) to give a lease that cannot be returned yet
-- ARGV[5]  the most (ms) the server's clock may be past ARGV[2]: a reap that
--          waited longer to run (Redis stalled) reaps nothing, since the
--          lease's holder had no chance to renew it meanwhile
--
-- The lease is reaped only if its deadline is still past (it was not
-- extended or settled meanwhile). A drained batch is put back in front of
-- its key's array (its items were appended first), and the key is made due;
-- a batch of retries goes back to the retry index, due now, with its
-- attempt counts. A batch that cannot be put back yet (the key holds a value
-- batchq did not write, or the lease holds one while the key has items)
-- keeps its lease, pushed to ARGV[4], and its key is made due, so that a
-- worker moves the bad value to dead letters. A drained batch of an ordered
-- queue ends the hold of its key (see release_hold): when it goes back, it
-- is in front of the key, to be drained first; when it cannot, the other
-- value is drained first. Returns 1 when reaped,
-- 0 otherwise.
local lease, now, key = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local t = redis.call('TIME')
if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - now > tonumber(ARGV[5]) then
  return 0
end
local deadline = redis.call('ZSCORE', KEYS[1], lease)
if not deadline or tonumber(deadline) > now then
  return 0
end
if key == '' then
  local kv = redis.call('HGETALL', KEYS[2])
  for i = 1, #kv, 2 do
    redis.call('ZADD', KEYS[9], now, kv[i])
    redis.call('HSET', KEYS[10], kv[i], kv[i + 1])
  end
  redis.call('DEL', KEYS[2])
elseif redis.call('EXISTS', KEYS[2]) == 1 then
  local n = tonumber(redis.pcall('GET', KEYS[5])) or 0
  local ok, val = pcall(redis.call, 'GET', KEYS[2])
  -- A lease whose count does not record its length (none at all, say)
  -- holds a value another program wrote: it goes back as it was, without
  -- a count, and is never merged into an array batchq wrote.
  local ours = n > 0 and ok and is_array(val) and select(2, counted(n)) == #val
  local back = true
  if ours and can_prepend(KEYS[3], KEYS[4]) then
    prepend_array(KEYS[3], KEYS[4], val, (counted(n)))
    redis.call('DEL', KEYS[2])
  elseif redis.call('EXISTS', KEYS[3]) == 0 then
    -- Not ours (a missing key takes ours by prepend_array): the value goes
    -- back without a count.
    redis.call('RENAME', KEYS[2], KEYS[3])
  else
    -- It cannot go back yet. An ordered key's hold ends all the same, or
    -- the other value would never be drained: it goes first.
    redis.call('ZADD', KEYS[1], 'XX', ARGV[4], lease)
    back = false
  end
  release_hold(KEYS[11], lease, KEYS[3], KEYS[6], KEYS[7], KEYS[8], now, key)
  make_due(KEYS[6], KEYS[7], KEYS[8], now, key)
  if not back then
    return 0
  end
elseif key ~= '' then
  release_hold(KEYS[11], lease, KEYS[3], KEYS[6], KEYS[7], KEYS[8], now, key)
end
-- (Also when there is no lease key: an empty lease left by a drain that
-- found no key, or a batch settled up to its ZREM.)
redis.call('DEL', KEYS[5])
redis.call('ZREM', KEYS[1], lease)
return 1
