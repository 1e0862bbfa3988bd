-- merge.lua: append items to a key's JSON array and make the key due at
-- once (docs/PROTOCOL.md, "Append"). It is the producer's hot path: a queue
-- without a flush policy appends one key per call through it. It does what
-- merge_key (lib.lua) does for a key without a flush policy, written out
-- without functions, since every call of a script pays for each function
-- it defines; TestMergeScriptsAgree holds the two to the same results.
--
-- KEYS[1] items key   <prefix>:{q:s}:k:<key>
-- KEYS[2] count key   <prefix>:{q:s}:n:<key>
-- KEYS[3] ready ZSET  <prefix>:{q:s}:ready
-- KEYS[4] wake LIST   <prefix>:{q:s}:wake
-- KEYS[5] later ZSET  <prefix>:{q:s}:later
-- ARGV[1] the items: valid JSON values joined by commas, after a comma and
--         before a closing bracket (",a,b]"; validated by the caller)
-- ARGV[2] how many items ARGV[1] holds
-- ARGV[3] the key, as a member of the ready and later indexes
-- ARGV[4] now (ms): the server's time, as the producer knows it
-- ARGV[5] the key's item cap (0: the most, 8,388,607)
-- ARGV[6] the key's byte cap (0: the most, 512 MiB)
--
-- Returns 0. Errors, storing nothing, with NOTARRAY when the items key holds
-- something other than the array batchq wrote, or with FULL <items>
-- <bytes> when the items would take the key past a cap; the key is made due
-- at once either way, so that a worker drains it (or moves the bad value to
-- dead letters). Errors with Redis' own OOM reply, writing nothing at all,
-- when Redis is out of memory and refuses the first write (see the INCRBY).
local payload, n = ARGV[1], tonumber(ARGV[2])
local maxn, maxb = tonumber(ARGV[5]), tonumber(ARGV[6])
if maxn <= 0 or maxn > 8388607 then
  maxn = 8388607 -- max_items
end
if maxb <= 0 or maxb > 536870912 then
  maxb = 536870912 -- max_string
end
-- The count packs the items (times 2^30) and the array's length minus one.
local delta = n * 1073741824 + #payload - 1
local v = redis.pcall('INCRBY', KEYS[2], delta)
local err
if type(v) == 'table' then
  if string.find(v.err or '', 'OOM command not allowed', 1, true) then
    -- Redis is past maxmemory and evicts nothing: it refuses a script's
    -- writes until one has gone through, and this is the first. Nothing is
    -- stored; write nothing more (making the key due would pass). The
    -- reply is the same on every version (Redis 6 puts the script's name
    -- and line in front of v.err); lib.lua's oom gives it too.
    return redis.error_reply("OOM command not allowed when used memory > 'maxmemory'")
  end
  err = redis.error_reply('NOTARRAY the count of the key is not an integer')
elseif v == delta then
  -- No count: a new array, unless another program left a value here.
  if n > maxn or #payload + 1 > maxb then
    redis.call('DEL', KEYS[2])
    err = redis.error_reply('FULL 0 0')
  elseif redis.call('SET', KEYS[1], '[' .. string.sub(payload, 2), 'NX') then
    if redis.call('ZADD', KEYS[3], 'NX', ARGV[4], ARGV[3]) == 1 then
      redis.call('RPUSH', KEYS[4], ARGV[3])
    end
    return 0
  else
    redis.call('DEL', KEYS[2])
    err = redis.error_reply('NOTARRAY the key holds a value batchq did not write (it has no count)')
  end
else
  local items = math.floor((v - delta) / 1073741824)
  local len = v - delta - items * 1073741824 + 1
  if redis.pcall('GETRANGE', KEYS[1], len - 1, len) ~= ']' or redis.pcall('GETRANGE', KEYS[1], 0, 0) ~= '[' then
    redis.call('DECRBY', KEYS[2], delta)
    err = redis.error_reply('NOTARRAY the key holds a value batchq did not write (not the array its count records)')
  elseif items + n > maxn or len + #payload - 1 > maxb then
    redis.call('DECRBY', KEYS[2], delta)
    err = redis.error_reply('FULL ' .. items .. ' ' .. len)
  else
    redis.call('SETRANGE', KEYS[1], len - 1, payload)
    return 0
  end
end
-- Refused: make the key due at once (make_due in lib.lua).
redis.call('ZREM', KEYS[5], ARGV[3])
if redis.call('ZADD', KEYS[3], 'NX', ARGV[4], ARGV[3]) == 1 then
  redis.call('RPUSH', KEYS[4], ARGV[3])
end
return err
