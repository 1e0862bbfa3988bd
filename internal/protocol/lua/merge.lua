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
local len, err = merge_key(KEYS[1], KEYS[2], KEYS[5], KEYS[3], KEYS[4], ARGV[3], ARGV[1], tonumber(ARGV[2]),
  tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]), now_ms())
if err then
  return err
end
return len
