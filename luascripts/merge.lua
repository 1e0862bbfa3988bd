-- merge.lua: append items to a key's JSON array and make the key ready.
--
-- KEYS[1] items key   <prefix>:{q:s}:k:<key>
-- KEYS[2] ready ZSET  <prefix>:{q:s}:ready
-- KEYS[3] wake LIST   <prefix>:{q:s}:wake
-- ARGV[1] the items: valid JSON values joined by commas (validated by the caller)
-- ARGV[2] now, in ms: the key's due time if it is not ready yet
-- ARGV[3] the key, as a member of the ready index
--
-- Returns the stored array's length in bytes before the append. Errors with
-- NOTARRAY, storing nothing, when the items key holds something other than a
-- JSON array; the key is then made ready, so that a worker moves the bad value
-- to dead letters.
local len, err = append_items(KEYS[1], ARGV[1])
make_ready(KEYS[2], KEYS[3], ARGV[2], ARGV[3])
if err then
  return err
end
return len
