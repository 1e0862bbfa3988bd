-- merge.lua: append items to a key's JSON array and make the key due.
--
-- KEYS[1] items key   <prefix>:{q:s}:k:<key>
-- KEYS[2] count key   <prefix>:{q:s}:n:<key>
-- KEYS[3] ready ZSET  <prefix>:{q:s}:ready
-- KEYS[4] wake LIST   <prefix>:{q:s}:wake
-- KEYS[5] cap key     <prefix>:{q:s}:c:<key> (used with a quiet period only)
-- ARGV[1] the items: valid JSON values joined by commas (validated by the caller)
-- ARGV[2] how many items ARGV[1] holds
-- ARGV[3] the key, as a member of the ready index
-- ARGV[4] the key's item cap (0: none)
-- ARGV[5] the key's byte cap (0: none)
-- ARGV[6] flush policy, max age (ms): the key is due at most this long
--         after its first pending item (0: due at once, the rest unused)
-- ARGV[7] flush policy, quiet period (ms): the key is due once no item has
--         come for this long, but never past the max age (0: none)
-- ARGV[8] flush policy, items: the key is due at once when it holds this
--         many (0: no such limit)
-- ARGV[9] flush policy, bytes: the key is due at once when its array is
--         this long (0: no such limit)
--
-- Due times come from the server's clock (TIME), never the producer's.
-- Returns the stored array's length in bytes before the append. Errors,
-- storing nothing, with NOTARRAY when the items key holds something other
-- than a JSON array, or with FULL <items> <bytes> when the items would take
-- the key past a cap; the key is made due at once either way, so that a
-- worker drains it (or moves the bad value to dead letters).
local ready, wake, key = KEYS[3], KEYS[4], ARGV[3]
local len, count, size, err = append_items(KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[4]), tonumber(ARGV[5]))
local now = now_ms()
local maxage = tonumber(ARGV[6])
if maxage == 0 then
  -- No flush policy: due at once. A key already on the index keeps its
  -- due time, or the claim a worker has on it.
  make_ready(ready, wake, now, key)
  if err then
    return err
  end
  return len
end
if err then
  make_due(ready, wake, now, key)
  return err
end

local quiet, fitems, fbytes = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
if (fitems > 0 and count >= fitems) or (fbytes > 0 and size >= fbytes) then
  make_due(ready, wake, now, key)
elseif quiet == 0 then
  make_ready(ready, wake, now + maxage, key)
elseif not redis.call('ZSCORE', ready, key) then
  -- The key's first pending item: remember when it must be due at the
  -- latest (the entry outlives that time by a minute, then expires).
  redis.call('SET', KEYS[5], now + maxage, 'PX', maxage + 60000)
  make_ready(ready, wake, now + math.min(quiet, maxage), key)
else
  -- Debounce: each item pushes the due time back by the quiet period, up to
  -- the cap set by the first.
  local cap = tonumber(redis.call('GET', KEYS[5]) or now)
  redis.call('ZADD', ready, 'XX', math.min(now + quiet, cap), key)
end
return len
