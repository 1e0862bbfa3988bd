-- mergemany.lua: append items to several keys of one queue shard at once,
-- each as merge_key (lib.lua) does (docs/PROTOCOL.md, "Append"): what a
-- lingering producer sends, and every append to a queue with a flush policy.
--
-- KEYS[1] ready ZSET
-- KEYS[2] wake LIST
-- KEYS[3] later ZSET
-- then per key i = 1..m: KEYS[3i+1], KEYS[3i+2], KEYS[3i+3]: its items,
--         count and cap keys
-- ARGV[1] item cap per key, ARGV[2] byte cap per key (0: the most)
-- ARGV[3] now (ms), as merge.lua
-- ARGV[4..7] flush policy: max age, quiet period, items, bytes (see
--         merge_key; max age 0: none)
-- then per key i: ARGV[3i+5], ARGV[3i+6], ARGV[3i+7]: the key (a member of
--         the indexes), how many items, the items as merge.lua takes them
--
-- Returns one reply per key, in order: 0, or the error text (NOTARRAY ...,
-- FULL ...) when that key stored nothing. Keys do not depend on each other:
-- one key's error does not keep the others from being stored. When Redis is
-- out of memory, it refuses the first key's INCRBY, and then every key's
-- (nothing was written): each reply is Redis' OOM error text. Once a write
-- has gone through, Redis refuses none of the script's.
local maxn, maxb, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local maxage, quiet, fitems, fbytes = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local out = {}
for i = 1, (#KEYS - 3) / 3 do
  local k, a = 3 * i + 1, 3 * i + 5
  local err = merge_key(KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[1], KEYS[3], KEYS[2], ARGV[a], ARGV[a + 2],
    tonumber(ARGV[a + 1]), maxn, maxb, now, maxage, quiet, fitems, fbytes)
  if err then
    out[i] = err.err
  else
    out[i] = 0
  end
end
return out
