-- register.lua: record queues in the registry of a prefix, and announce a
-- worker (docs/PROTOCOL.md, "Register").
--
-- KEYS[1] the registry HASH  <prefix>:queues (queue -> shards)
-- KEYS[2] (a worker only) the workers ZSET  <prefix>:workers:{<prefix>:queues} (name -> last seen, ms)
-- KEYS[3] (a worker only) the workerdata HASH  <prefix>:workerdata:{<prefix>:queues} (name -> JSON)
-- ARGV[1] the shard count of the caller
-- With KEYS[2] and KEYS[3]:
--   ARGV[2] the worker's name
--   ARGV[3] what it announces: a JSON object, stored as it is
--   ARGV[4] how long (ms) an announcement lasts: workers not seen for
--           longer are pruned, up to 100 per call
--   ARGV[5..] queue names
-- Without them (a producer): ARGV[2..] queue names.
--
-- Each queue keeps the largest shard count any producer or worker recorded
-- for it, so the inspector reads every shard that may hold items even when
-- two processes disagree. A worker's last seen time is the server's clock
-- (TIME), so that workers whose clocks disagree are pruned alike. Returns
-- the recorded counts, in the order of the queues.
local n = tonumber(ARGV[1])
local first = 2
if #KEYS == 3 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. (now - tonumber(ARGV[4])), 'LIMIT', 0, 100)
  if #gone > 0 then
    redis.call('ZREM', KEYS[2], unpack(gone))
    redis.call('HDEL', KEYS[3], unpack(gone))
  end
  redis.call('ZADD', KEYS[2], now, ARGV[2])
  redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
  first = 5
end
local out = {}
for i = first, #ARGV do
  local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[i])) or 0
  if cur < n then
    redis.call('HSET', KEYS[1], ARGV[i], n)
    cur = n
  end
  out[#out + 1] = cur
end
return out
