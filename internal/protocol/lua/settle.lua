-- settle.lua: record the outcome of a batch and release its lease
-- (docs/PROTOCOL.md, "Settle"). A batch whose items all succeeded is
-- settled without it, by DEL and ZREM; this script is for the others.
--
-- KEYS[1]  leases ZSET
-- KEYS[2]  the lease key (or, with no lease, the items key for a quarantine)
-- KEYS[3]  the items key of the batch's key (unused for retry batches)
-- KEYS[4]  count key of the batch's key
-- KEYS[5]  count key of the lease
-- KEYS[6]  ready ZSET
-- KEYS[7]  later ZSET
-- KEYS[8]  wake LIST
-- KEYS[9]  retry ZSET
-- KEYS[10] retrydata HASH
-- KEYS[11] dead ZSET
-- KEYS[12] deaddata HASH
-- KEYS[13] quarantine key
-- KEYS[14] quarantined SET (names of quarantine keys)
-- KEYS[15] settled marker of a batch without a lease
-- ARGV[1]  the lease (its member of the leases index), or "" for a batch
--          drained without a lease (at-most-once)
-- ARGV[2]  now (ms)
-- ARGV[3]  the batch's key
-- ARGV[4]  unfinished items to put back in front of the key's array (a JSON array), or ""
-- ARGV[5]  how many items ARGV[4] holds
-- ARGV[6]  dead letter cap per shard (0: unbounded); the oldest are dropped past it
-- ARGV[7]  flags: "q" to move KEYS[2] to the quarantine key instead of
--          deleting it; "r" to make the batch's key due (its value needs a
--          worker's look); "w" to push a hint (an empty name) on the wake
--          list, so that a worker claims now and learns when the retries
--          are due (sooner than its next periodic claim)
-- ARGV[8]  number of retries n, then n triples: id, due time (ms), envelope
-- then     number of dead letters m, then m pairs: id, envelope
-- then     number of holds h to end, then h keys of an ordered queue (see
--          release_hold: the batch's own key, held by its lease, or the
--          keys of a batch of retries); KEYS[14+2j] and KEYS[15+2j] are the
--          hold and the items key of the j-th
--
-- Every check comes before the first write, so the script applies whole or
-- not at all. Returns 1 when applied (or, for a batch without a lease,
-- already applied by an earlier call: KEYS[15] remembers it for a day); 0,
-- changing nothing, when the lease is no longer held (it expired and was
-- reaped: its items are being redelivered); -1, changing nothing, when the
-- unfinished items cannot be put back because the key holds a value that is
-- not batchq's array (send them to the retry index instead); -2, changing
-- nothing, when the value to quarantine is gone (or is a string now).
local lease, now, key, back = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
if lease ~= '' and not redis.call('ZSCORE', KEYS[1], lease) then
  return 0
end
if lease == '' and redis.call('EXISTS', KEYS[15]) == 1 then
  return 1
end
if back ~= '' and not can_prepend(KEYS[3], KEYS[4]) then
  return -1
end
local quarantine = string.find(ARGV[7], 'q', 1, true) ~= nil
if quarantine then
  local t = redis.call('TYPE', KEYS[2])
  if t.ok == 'none' or t.ok == 'string' then
    return -2 -- gone, or replaced by a string (a fresh array, say): not ours to move
  end
end

if lease == '' then
  redis.call('SET', KEYS[15], '1', 'PX', 86400000)
else
  redis.call('ZREM', KEYS[1], lease)
  redis.call('DEL', KEYS[5])
end
if quarantine then
  redis.call('RENAME', KEYS[2], KEYS[13])
  redis.call('SADD', KEYS[14], KEYS[13])
elseif lease ~= '' then
  redis.call('DEL', KEYS[2])
end
if back ~= '' then
  prepend_array(KEYS[3], KEYS[4], back, tonumber(ARGV[5]))
end
if back ~= '' or string.find(ARGV[7], 'r', 1, true) then
  make_due(KEYS[6], KEYS[7], KEYS[8], now, key)
end

local i = 8
local n = tonumber(ARGV[i])
for _ = 1, n do
  redis.call('ZADD', KEYS[9], ARGV[i + 2], ARGV[i + 1])
  redis.call('HSET', KEYS[10], ARGV[i + 1], ARGV[i + 3])
  i = i + 3
end
i = i + 1
local m = tonumber(ARGV[i])
for _ = 1, m do
  redis.call('ZADD', KEYS[11], now, ARGV[i + 1])
  redis.call('HSET', KEYS[12], ARGV[i + 1], ARGV[i + 2])
  i = i + 2
end
if n > 0 and string.find(ARGV[7], 'w', 1, true) then
  redis.call('RPUSH', KEYS[8], '')
end
i = i + 1
local owner = nil -- a batch of retries ends the holds of its keys whoever set them
if key ~= '' then
  owner = lease
end
for j = 1, tonumber(ARGV[i]) do
  release_hold(KEYS[14 + 2 * j], owner, KEYS[15 + 2 * j], KEYS[6], KEYS[7], KEYS[8], now, ARGV[i + j])
end
local cap = tonumber(ARGV[6])
if m > 0 and cap > 0 then
  -- Drop the oldest past the cap, in chunks: unpack takes a few thousand
  -- values at most.
  local over = redis.call('ZCARD', KEYS[11]) - cap
  while over > 0 do
    local chunk = math.min(over, 1000)
    local old = redis.call('ZRANGE', KEYS[11], 0, chunk - 1)
    redis.call('HDEL', KEYS[12], unpack(old))
    redis.call('ZREMRANGEBYRANK', KEYS[11], 0, chunk - 1)
    over = over - chunk
  end
end
return 1
