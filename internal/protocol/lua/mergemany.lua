-- mergemany.lua: append items to several keys of one queue shard at once,
-- each as merge.lua does; what a lingering producer sends.
--
-- KEYS[1] ready ZSET
-- KEYS[2] wake LIST
-- then per key i = 1..m: KEYS[3i], KEYS[3i+1], KEYS[3i+2]: its items, count
--         and cap keys
-- ARGV[1] item cap per key, ARGV[2] byte cap per key (0: none)
-- ARGV[3..6] flush policy: max age, quiet period, items, bytes (as merge.lua)
-- then per key i: ARGV[3i+4], ARGV[3i+5], ARGV[3i+6]: the key (a member of
--         the ready index), how many items, the items joined by commas
--
-- Returns one reply per key, in order: the length of its array before the
-- append (an integer), or the error text (NOTARRAY ..., FULL ...) when that
-- key stored nothing. Keys do not depend on each other: one key's error
-- does not keep the others from being stored.
local maxn, maxb = tonumber(ARGV[1]), tonumber(ARGV[2])
local maxage, quiet, fitems, fbytes = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local now = now_ms()
local out = {}
for i = 1, (#KEYS - 2) / 3 do
  local k, a = 3 * i, 3 * i + 4
  local len, err = merge_key(KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[1], KEYS[2], ARGV[a], ARGV[a + 2],
    tonumber(ARGV[a + 1]), maxn, maxb, maxage, quiet, fitems, fbytes, now)
  if err then
    out[i] = err.err
  else
    out[i] = len
  end
end
return out
