-- lib.lua: helpers shared by the batchq scripts. It is prepended to each
-- script when the script is loaded, so every script is one self-contained
-- EVAL. Nothing here decodes JSON: arrays are handled as strings, by their
-- first and last bytes.

-- is_array reports whether s looks like a JSON array as batchq writes it.
local function is_array(s)
  return string.byte(s, 1) == 91 and string.byte(s, -1) == 93 -- '[' and ']'
end

-- now_ms is the server's clock in milliseconds. Scripts that producers run
-- take their due times from it, so producers' clocks do not matter.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- max_string is Redis' largest string, in bytes (proto-max-bulk-len's
-- default): no array may grow past it.
local max_string = 536870912

-- A key's count (n:<key>) holds two numbers in one integer, so that one
-- INCRBY keeps both: its items times unit, plus the length of its array
-- minus one (the offset of the closing bracket). Lua numbers are doubles,
-- exact up to 2^53: a key holds at most max_items items.
local unit = 1073741824 -- 2^30, past max_string
local max_items = 8388607 -- 2^23 - 1

-- counted returns the items and the array length a count value says.
local function counted(v)
  local items = math.floor(v / unit)
  return items, v - items * unit + 1
end

-- append_items splices items (n JSON values joined by commas, never empty)
-- onto the JSON array stored at ik, creating it if missing, and keeps the
-- count at nk. It costs the same whatever the size of the stored array: it
-- reads three bytes and overwrites the closing bracket. With maxn or maxb
-- above 0, it refuses to take the array past maxn items or maxb bytes (and
-- never past max_items or max_string). It returns the stored length before
-- the append, the item count after it and the length after it; or nil and
-- an error reply (NOTARRAY, or FULL <items> <bytes>), storing nothing.
-- Every check that can fail comes before its first write, or undoes it.
--
-- An array batchq wrote always has its count beside it, and only batchq
-- writes counts: a value without one was written by another program,
-- however much it looks like an array ("[ ]", "[1,2]]"), and so is one
-- whose length is not the one its count records (another program replaced
-- the array). Both are refused. The count is read by the INCRBY the append
-- makes anyway: the checks are free.
local function append_items(ik, nk, items, n, maxn, maxb)
  if maxb <= 0 or maxb > max_string then
    maxb = max_string
  end
  if maxn <= 0 or maxn > max_items then
    maxn = max_items
  end
  local len = redis.pcall('STRLEN', ik)
  if type(len) == 'table' then
    return nil, nil, nil, redis.error_reply('NOTARRAY the key holds a Redis value that is not a string')
  end
  if len == 0 then
    local newlen = #items + 2
    if n > maxn or newlen > maxb then
      return nil, nil, nil, redis.error_reply('FULL 0 0')
    end
    if not redis.call('SET', ik, '[' .. items .. ']', 'NX') then
      return nil, nil, nil, redis.error_reply('NOTARRAY the key holds an empty string, not a JSON array')
    end
    redis.call('SET', nk, n * unit + newlen - 1)
    return len, n, newlen
  end
  if redis.call('GETRANGE', ik, 0, 0) ~= '[' or redis.call('GETRANGE', ik, -1, -1) ~= ']' then
    return nil, nil, nil, redis.error_reply('NOTARRAY the key holds a string that is not a JSON array')
  end
  local newlen = len + #items + 1
  if newlen > maxb then
    return nil, nil, nil, redis.error_reply('FULL ' .. counted(tonumber(redis.pcall('GET', nk)) or 0) .. ' ' .. len)
  end
  -- The count is raised first and lowered again in the rare case that the
  -- append is refused: one call on the common path, not a GET and an
  -- INCRBY. The SETRANGE after it cannot fail: the length is checked.
  local delta = n * unit + #items + 1
  local v = redis.pcall('INCRBY', nk, delta)
  if type(v) == 'table' then
    return nil, nil, nil, redis.error_reply('NOTARRAY the count of the key is not an integer')
  end
  if v == delta then
    redis.call('DEL', nk)
    return nil, nil, nil, redis.error_reply('NOTARRAY the key holds a value batchq did not write (it has no count)')
  end
  local count, oldlen = counted(v - delta)
  if oldlen ~= len then
    redis.call('DECRBY', nk, delta)
    return nil, nil, nil, redis.error_reply('NOTARRAY the key holds a value batchq did not write (its length is not the one its count records)')
  end
  if count + n > maxn then
    redis.call('DECRBY', nk, delta)
    return nil, nil, nil, redis.error_reply('FULL ' .. count .. ' ' .. len)
  end
  redis.call('SETRANGE', ik, len - 1, ',' .. items .. ']')
  return len, count + n, newlen
end

-- ours reports whether the string cur, read from ik, can take items back:
-- it is missing, or an array batchq wrote (its count at nk records its
-- length).
local function ours(cur, nk)
  if not cur then
    return true
  end
  local v = tonumber(redis.pcall('GET', nk))
  return v ~= nil and is_array(cur) and select(2, counted(v)) == #cur
end

-- can_prepend reports whether prepend_array(ik, nk, ...) would succeed: ik
-- is missing or holds an array batchq wrote.
local function can_prepend(ik, nk)
  local ok, cur = pcall(redis.call, 'GET', ik)
  return ok and ours(cur, nk)
end

-- prepend_array puts the n items of the JSON array arr in front of those
-- stored at ik (returned items were appended before the stored ones) and
-- keeps the count at nk. It returns false, changing nothing, when ik holds
-- something other than an array batchq wrote.
local function prepend_array(ik, nk, arr, n)
  if arr == '[]' then
    return true
  end
  local ok, cur = pcall(redis.call, 'GET', ik)
  if not ok or not ours(cur, nk) then
    return false
  end
  local delta = n * unit + #arr - 1
  if not cur then
    redis.call('SET', ik, arr)
    redis.call('SET', nk, delta)
  else
    redis.call('SET', ik, string.sub(arr, 1, -2) .. ',' .. string.sub(cur, 2))
    redis.call('INCRBY', nk, delta)
  end
  return true
end

-- make_ready puts key on the ready index due at 'due' unless it is there
-- already (an earlier due time wins), and wakes one idle worker when it was
-- not.
local function make_ready(ready, wake, due, key)
  if redis.call('ZADD', ready, 'NX', due, key) == 1 then
    redis.call('LPUSH', wake, '1')
    redis.call('LTRIM', wake, 0, 63)
  end
end

-- make_due puts key on the ready index due at 'due', or moves it there
-- when it is due later (LT), and wakes one idle worker when it did either.
local function make_due(ready, wake, due, key)
  if redis.call('ZADD', ready, 'LT', 'CH', due, key) == 1 then
    redis.call('LPUSH', wake, '1')
    redis.call('LTRIM', wake, 0, 63)
  end
end

-- merge_key appends the n items (JSON values joined by commas) to key,
-- whose items, count and cap keys are ik, nk and ck, and makes the key due
-- as the flush policy says (maxage, quiet, fitems, fbytes: see merge.lua),
-- now being the server's time. It returns the stored array's length before
-- the append, or nil and an error reply (NOTARRAY, FULL), storing nothing;
-- the key is then due at once, so that a worker drains it.
local function merge_key(ik, nk, ck, ready, wake, key, items, n, maxn, maxb, maxage, quiet, fitems, fbytes, now)
  local len, count, size, err = append_items(ik, nk, items, n, maxn, maxb)
  if maxage == 0 then
    -- No flush policy: due at once. A key already on the index keeps its
    -- due time, or the claim a worker has on it.
    make_ready(ready, wake, now, key)
    return len, err
  end
  if err then
    make_due(ready, wake, now, key)
    return nil, err
  end
  if (fitems > 0 and count >= fitems) or (fbytes > 0 and size >= fbytes) then
    make_due(ready, wake, now, key)
  elseif quiet == 0 then
    make_ready(ready, wake, now + maxage, key)
  else
    local due = redis.call('ZSCORE', ready, key)
    if not due then
      -- The key's first pending item: remember when it must be due at the
      -- latest (the entry outlives that time by a minute, then expires).
      redis.call('SET', ck, now + maxage, 'PX', maxage + 60000)
      make_ready(ready, wake, now + math.min(quiet, maxage), key)
    elseif tonumber(due) > now then
      -- Debounce: each item pushes the due time back by the quiet period,
      -- up to the cap set by the first. A key already due stays due: it
      -- may be full, or hold items put back by a worker.
      local cap = tonumber(redis.call('GET', ck) or due)
      redis.call('ZADD', ready, 'XX', math.min(now + quiet, cap), key)
    end
  end
  return len
end
