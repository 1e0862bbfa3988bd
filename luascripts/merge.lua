-- merge.lua: append items to a key's JSON array and make the key ready.
--
-- KEYS[1] items key   <prefix>:{q:s}:k:<key>
-- KEYS[2] count key   <prefix>:{q:s}:n:<key>
-- KEYS[3] ready ZSET  <prefix>:{q:s}:ready
-- KEYS[4] wake LIST   <prefix>:{q:s}:wake
-- ARGV[1] the items: valid JSON values joined by commas (validated by the caller)
-- ARGV[2] how many items ARGV[1] holds
-- ARGV[3] the key, as a member of the ready index
-- ARGV[4] the key's item cap (0: none)
-- ARGV[5] the key's byte cap (0: none)
--
-- The key's due time, if it is not ready yet, is the server's clock (TIME).
-- Returns the stored array's length in bytes before the append. Errors,
-- storing nothing, with NOTARRAY when the items key holds something other
-- than a JSON array, or with FULL <items> <bytes> when the items would take
-- the key past a cap; the key is made ready either way, so that a worker
-- drains it (or moves the bad value to dead letters).
local len, err = append_items(KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[4]), tonumber(ARGV[5]))
make_ready(KEYS[3], KEYS[4], now_ms(), ARGV[3])
if err then
  return err
end
return len
