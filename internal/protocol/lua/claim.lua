-- claim.lua: claim due keys and due retries of one queue shard.
--
-- KEYS[1] ready ZSET      key -> due time (ms)
-- KEYS[2] retry ZSET      retry id -> due time (ms)
-- KEYS[3] retrydata HASH  retry id -> envelope
-- KEYS[4] leases ZSET     token -> deadline (ms)
-- KEYS[5] leasemeta HASH  token -> lease kind
-- KEYS[6] lease key for the retries claimed by this call
-- ARGV[1] now (ms): retries due by then are due
-- ARGV[2] max batches to claim: keys, plus one batch of retries
-- ARGV[3] claimed keys' new due time (ms): when they are due again should the
--         claimer die before draining them
-- ARGV[4] max retries to claim in the batch of retries (0: none)
-- ARGV[5] token of the retry lease
-- ARGV[6] retry lease deadline (ms)
-- ARGV[7] the retry lease's description (r:<consumer name>)
-- ARGV[8] keys due by then (ms) are due: now plus the slack of a consumer
--         that knows the server's clock, which timed the keys, only roughly
--
-- When retries are due, one of the max batches is theirs; with max 1, the
-- batch goes to whichever has waited longer, the oldest due key or the
-- oldest due retry. So retries are never starved by keys that are always due.
--
-- Returns {keys, {id1, env1, id2, env2, ...}, next} where next is the earliest
-- due time left on either index (ms, as a string), or "" when both are empty.
local now = tonumber(ARGV[1])
local know = tonumber(ARGV[8])
local max = tonumber(ARGV[2])
local maxr = tonumber(ARGV[4])

local rhead = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
local retries_due = maxr > 0 and rhead[2] ~= nil and tonumber(rhead[2]) <= now
local kmax = max
if retries_due then
  if max > 1 then
    kmax = max - 1
  else
    local khead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', know, 'WITHSCORES', 'LIMIT', 0, 1)
    if khead[2] == nil or tonumber(rhead[2]) <= tonumber(khead[2]) then
      kmax = 0
    else
      retries_due = false
    end
  end
end

local keys = {}
if kmax > 0 then
  keys = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', know, 'LIMIT', 0, kmax)
  for _, k in ipairs(keys) do
    redis.call('ZADD', KEYS[1], 'XX', ARGV[3], k)
  end
end

local retries = {}
if retries_due then
  local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, maxr)
  if #ids == 0 then ids = {'-'} end -- not reached: the head was due
  local envs = redis.call('HMGET', KEYS[3], unpack(ids))
  for i, id in ipairs(ids) do
    if envs[i] then
      retries[#retries + 1] = id
      retries[#retries + 1] = envs[i]
    end
  end
  -- The lease first: if writing it failed, the retries would still be in place.
  if #retries > 0 then
    redis.call('HSET', KEYS[6], unpack(retries))
    redis.call('ZADD', KEYS[4], ARGV[6], ARGV[5])
    redis.call('HSET', KEYS[5], ARGV[5], ARGV[7])
  end
  redis.call('ZREM', KEYS[2], unpack(ids))
  redis.call('HDEL', KEYS[3], unpack(ids))
end

local next = ''
local r = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local t = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if r[2] then next = r[2] end
if t[2] and (next == '' or tonumber(t[2]) < tonumber(next)) then next = t[2] end
return {keys, retries, next}
