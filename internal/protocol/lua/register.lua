-- register.lua: record queues and their shard counts in the registry of a
-- prefix, and announce a worker (docs/PROTOCOL.md, "Register" and "Shards").
--
-- KEYS[1] the registry HASH  <prefix>:queues (queue -> shards)
-- KEYS[2] (a worker only) the workers ZSET  <prefix>:workers:{<prefix>:queues} (name -> last seen, ms)
-- KEYS[3] (a worker only) the workerdata HASH  <prefix>:workerdata:{<prefix>:queues} (name -> JSON)
-- KEYS[#KEYS] the grown HASH  <prefix>:grown:{<prefix>:queues} (queue ->
--         the counts it had before, ascending: "2,4"), where a raised
--         count's predecessor is added
-- With KEYS[2] and KEYS[3]:
--   ARGV[1] the worker's name
--   ARGV[2] what it announces: a JSON object, stored as it is
--   ARGV[3] how long (ms) an announcement lasts: workers not seen for
--           longer are pruned, up to 100 per call
--   ARGV[4..] the queues, three arguments each: its name, the shards the
--           caller already routes or drains it by (0: none yet), and the
--           count to record when the registry does not hold it (0: record
--           none; the caller asks again with one)
-- Without them (a producer): ARGV[1..] the queues, as above.
--
-- The registry is where a queue's shard count lives: the first writer
-- records it and every later one reads it. A caller's own count
-- only raises it, never lowers it: a caller that routed or drained more
-- shards than the registry holds (the queue was forgotten and recorded
-- anew meanwhile) may have items in them, and the count must cover them.
-- A value that is not a count of 1 to 1024, written by another program,
-- counts as none, and is replaced. A worker's last seen time is the
-- server's clock (TIME), so that workers whose clocks disagree are pruned
-- alike. Returns the recorded counts, in the order of the queues: 0 for a
-- queue left unrecorded.
local function count(v)
  if type(v) ~= 'string' or not string.match(v, '^[1-9]%d?%d?%d?$') then
    return nil
  end
  local n = tonumber(v)
  if n > 1024 then
    return nil
  end
  return n
end

local grown = KEYS[#KEYS]
local first = 1
if #KEYS == 4 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. (now - tonumber(ARGV[3])), 'LIMIT', 0, 100)
  if #gone > 0 then
    redis.call('ZREM', KEYS[2], unpack(gone))
    redis.call('HDEL', KEYS[3], unpack(gone))
  end
  redis.call('ZADD', KEYS[2], now, ARGV[1])
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
  first = 4
end
local out = {}
for i = first, #ARGV, 3 do
  local cur = count(redis.call('HGET', KEYS[1], ARGV[i]))
  local want = cur or tonumber(ARGV[i + 2])
  local floor = tonumber(ARGV[i + 1])
  if floor > want then
    want = floor
  end
  if want > 0 and want ~= cur then
    redis.call('HSET', KEYS[1], ARGV[i], want)
    if cur then
      grew(grown, ARGV[i], cur)
    end
  end
  out[#out + 1] = want
end
return out
