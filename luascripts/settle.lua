-- settle.lua: record the outcome of a batch and release its lease.
--
-- KEYS[1]  leases ZSET
-- KEYS[2]  leasemeta HASH
-- KEYS[3]  the lease key (or, with no lease, the items key for a quarantine)
-- KEYS[4]  the items key of the batch's key (unused for retry batches)
-- KEYS[5]  ready ZSET
-- KEYS[6]  wake LIST
-- KEYS[7]  retry ZSET
-- KEYS[8]  retrydata HASH
-- KEYS[9]  dead ZSET
-- KEYS[10] deaddata HASH
-- KEYS[11] quarantine key
-- ARGV[1]  lease token, or "" for a batch drained without a lease (at-most-once)
-- ARGV[2]  now (ms)
-- ARGV[3]  the batch's key
-- ARGV[4]  unfinished items to put back in front of the key's array (a JSON array), or ""
-- ARGV[5]  dead letter cap per shard (0: unbounded); the oldest are dropped past it
-- ARGV[6]  "1" to move KEYS[3] to the quarantine key instead of deleting it
-- ARGV[7]  number of retries n, then n triples: id, due time (ms), envelope
-- then     number of dead letters m, then m pairs: id, envelope
--
-- Returns 1 when applied; 0, changing nothing, when the lease is no longer held
-- (it expired and was reaped: its items are being redelivered); -1, changing
-- nothing, when the unfinished items could not be put back because the key
-- holds a value that is not a JSON array (the lease is then reaped later).
if ARGV[1] ~= '' and not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 0
end
if ARGV[4] ~= '' and not prepend_array(KEYS[4], ARGV[4]) then
  return -1
end
if ARGV[4] ~= '' then
  make_ready(KEYS[5], KEYS[6], ARGV[2], ARGV[3])
end
if ARGV[1] ~= '' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
end
if ARGV[6] == '1' then
  redis.call('RENAME', KEYS[3], KEYS[11])
elseif ARGV[1] ~= '' then
  redis.call('DEL', KEYS[3])
end

local i = 7
local n = tonumber(ARGV[i])
for j = 1, n do
  local id, due, env = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  redis.call('ZADD', KEYS[7], due, id)
  redis.call('HSET', KEYS[8], id, env)
  i = i + 3
end
i = i + 1
local m = tonumber(ARGV[i])
for j = 1, m do
  redis.call('ZADD', KEYS[9], ARGV[2], ARGV[i + 1])
  redis.call('HSET', KEYS[10], ARGV[i + 1], ARGV[i + 2])
  i = i + 2
end
local cap = tonumber(ARGV[5])
if m > 0 and cap > 0 then
  local over = redis.call('ZCARD', KEYS[9]) - cap
  if over > 0 then
    local old = redis.call('ZRANGE', KEYS[9], 0, over - 1)
    redis.call('HDEL', KEYS[10], unpack(old))
    redis.call('ZREMRANGEBYRANK', KEYS[9], 0, over - 1)
  end
end
return 1
