-- state.lua: read what one queue shard holds, at once, for
-- batchqtest.RunUntilIdle (docs/PROTOCOL.md, "Keys"). Every step of the
-- protocol moves work between keys of one shard atomically (a drain from
-- ready to leases, a settle from leases to retry, a reap back), so reading
-- them in one script never sees a step half done. It writes nothing.
--
-- KEYS[1]  ready ZSET
-- KEYS[2]  later ZSET
-- KEYS[3]  wake LIST
-- KEYS[4]  leases ZSET
-- KEYS[5]  retry ZSET
-- KEYS[6]  dead ZSET
--
-- Returns {ready (but for keys held, at held_due), later, wake, leases,
-- retries, the earliest retry's due time (ms; -1 when there is none), dead
-- letters, the server's time (ms)}.
local t = redis.call('TIME')
local first = redis.call('ZRANGE', KEYS[5], 0, 0, 'WITHSCORES')
local due = -1
if first[2] then
  due = tonumber(first[2])
end
return {
  -- Keys an ordered queue holds wait at held_due: they move only with the
  -- batch or retry that holds them, which the other counts show.
  redis.call('ZCARD', KEYS[1]) - #redis.call('ZRANGEBYSCORE', KEYS[1], held_due, '+inf'),
  redis.call('ZCARD', KEYS[2]),
  redis.call('LLEN', KEYS[3]),
  redis.call('ZCARD', KEYS[4]),
  redis.call('ZCARD', KEYS[5]),
  due,
  redis.call('ZCARD', KEYS[6]),
  tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000),
}
