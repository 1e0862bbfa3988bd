-- claim.lua: the periodic work of a worker on one queue shard
-- (docs/PROTOCOL.md, "Promote", "Retry" and "Sweep"): make the keys that a
-- flush policy scheduled due once their time has come, take due retries
-- into a lease, and push back on the wake list the keys that a worker
-- popped but never drained (it died in between).
--
-- KEYS[1] ready ZSET      key -> due time (ms), keys due and pushed
-- KEYS[2] later ZSET      key -> due time (ms), keys a flush policy scheduled
-- KEYS[3] wake LIST       due keys for workers to pop
-- KEYS[4] retry ZSET      retry id -> due time (ms)
-- KEYS[5] retrydata HASH  retry id -> envelope
-- KEYS[6] leases ZSET     lease -> deadline (ms)
-- KEYS[7] lease key for the retries claimed by this call
-- ARGV[1] now (ms), the server's time as the worker knows it
-- ARGV[2] grace (ms): a key due longer than this and on no wake list was
--         popped by a worker that died before draining it
-- ARGV[3] max retries to claim (0: none)
-- ARGV[4] the retry lease, as a member of the leases index
-- ARGV[5] the retry lease's deadline (ms)
--
-- Keys are promoted, and stranded keys pushed back, 1,000 and 100 at a time
-- at most. Returns {{id1, env1, id2, env2, ...}, next key due time, next
-- retry due time, keys pushed}, the due times as strings, "" when nothing
-- is scheduled.
local now = tonumber(ARGV[1])
local pushed = 0

local function push(names)
  for i = 1, #names, 1000 do
    redis.call('RPUSH', KEYS[3], unpack(names, i, math.min(i + 999, #names)))
  end
  pushed = pushed + #names
end

local lhead = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if lhead[2] and tonumber(lhead[2]) <= now then
  local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'WITHSCORES', 'LIMIT', 0, 1000)
  local names = {}
  for i = 1, #due, 2 do
    redis.call('ZREM', KEYS[2], due[i])
    if redis.call('ZADD', KEYS[1], 'NX', due[i + 1], due[i]) == 1 then
      names[#names + 1] = due[i]
    end
  end
  push(names)
  lhead = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
end

local retries = {}
local maxr = tonumber(ARGV[3])
if maxr > 0 then
  local ids = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, maxr)
  if #ids > 0 then
    local envs = redis.call('HMGET', KEYS[5], unpack(ids))
    for i, id in ipairs(ids) do
      if envs[i] then
        retries[#retries + 1] = id
        retries[#retries + 1] = envs[i]
      end
    end
    -- The lease first: if writing it failed, the retries would still be in
    -- place.
    if #retries > 0 then
      redis.call('HSET', KEYS[7], unpack(retries))
      redis.call('ZADD', KEYS[6], ARGV[5], ARGV[4])
    end
    redis.call('ZREM', KEYS[4], unpack(ids))
    redis.call('HDEL', KEYS[5], unpack(ids))
  end
end

-- A key is on the ready index from the moment it is pushed until a worker
-- drains it, and drains follow pops within a round trip. With nothing on
-- the wake list, a key due for longer than the grace was popped by a worker
-- that died before draining it: push it again.
local rhead = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if rhead[2] and tonumber(rhead[2]) <= now - tonumber(ARGV[2]) and redis.call('LLEN', KEYS[3]) == 0 then
  push(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]), 'LIMIT', 0, 100))
end

local thead = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
return {retries, lhead[2] or '', thead[2] or '', pushed}
