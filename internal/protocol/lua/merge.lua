-- merge.lua: append items to a key's JSON array and make the key due
-- (docs/PROTOCOL.md, "Append").
--
-- KEYS[1] items key   <prefix>:{q:s}:k:<key>
-- KEYS[2] count key   <prefix>:{q:s}:n:<key>
-- KEYS[3] ready ZSET  <prefix>:{q:s}:ready
-- KEYS[4] wake LIST   <prefix>:{q:s}:wake
-- KEYS[5] later ZSET  <prefix>:{q:s}:later
-- KEYS[6] cap key     <prefix>:{q:s}:c:<key> (with a flush policy only)
-- ARGV[1] the items: valid JSON values joined by commas, after a comma and
--         before a closing bracket (",a,b]"; validated by the caller)
-- ARGV[2] how many items ARGV[1] holds
-- ARGV[3] the key, as a member of the ready and later indexes
-- ARGV[4] now (ms): the server's time, as the producer knows it
-- ARGV[5] the key's item cap (0: the most, 8,388,607)
-- ARGV[6] the key's byte cap (0: the most, 512 MiB)
-- ARGV[7..10] with a flush policy only: max age (ms; the key is due at most
--         this long after its first pending item), quiet period (ms; due
--         once no item has come for this long, never past the max age; 0:
--         none), items and bytes (due at once when the key holds this many;
--         0: no such limit)
--
-- Returns 0. Errors, storing nothing, with NOTARRAY when the items key holds
-- something other than the array batchq wrote, or with FULL <items>
-- <bytes> when the items would take the key past a cap; the key is made due
-- at once either way, so that a worker drains it (or moves the bad value to
-- dead letters).
local maxage, quiet, fitems, fbytes = 0, 0, 0, 0
if #ARGV > 6 then
  maxage, quiet, fitems, fbytes = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
end
local err = merge_key(KEYS[1], KEYS[2], KEYS[6], KEYS[3], KEYS[5], KEYS[4], ARGV[3], ARGV[1], tonumber(ARGV[2]),
  tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[4]), maxage, quiet, fitems, fbytes)
if err then
  return err
end
return 0
