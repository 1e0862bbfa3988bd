-- lib.lua: helpers shared by the batchq scripts. Each script is loaded with
-- the helpers it uses in front of it, and only those (every call of a
-- script pays for each function it defines), so that every script is one
-- self-contained EVAL. A helper is a top-level "local function NAME" or
-- "local NAME =" with the comment above it. The protocol they serve is
-- described in docs/PROTOCOL.md. Nothing here decodes JSON: arrays are
-- handled as strings, by their ends.

-- is_array reports whether s looks like a JSON array as batchq writes it.
local function is_array(s)
  return string.byte(s, 1) == 91 and string.byte(s, -1) == 93 -- '[' and ']'
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

-- counted returns the items and the array length a count value records.
local function counted(v)
  local items = math.floor(v / unit)
  return items, v - items * unit + 1
end

-- make_due makes key due at once: off the schedule of a flush policy, on
-- the ready index, due at now, and on the wake list for a worker to pop;
-- unless it is on the ready index already.
local function make_due(ready, later, wake, now, key)
  redis.call('ZREM', later, key)
  if redis.call('ZADD', ready, 'NX', now, key) == 1 then
    redis.call('RPUSH', wake, key)
  end
end

-- held_due is the due time (ms, 2^53) of a key that waits on the ready
-- index for its hold to end: no claim, sweep or drain takes it (see
-- protocol.HeldDue).
local held_due = 9007199254740992

-- release_hold ends the hold of key, an ordered queue's key (its batch is
-- settled, or reaped), if the lease owner holds it (any holder, with no
-- owner: a batch of retries ends the holds of its keys, which their drains
-- set), and makes the key due if items came meanwhile: they waited for the
-- hold to end, on the ready index at held_due if a worker found the key
-- held. A key that a flush policy has scheduled stays scheduled, and one
-- parked with no items leaves the ready index: a key parked at held_due
-- would take no push from an append or a promotion again. A key that was
-- not held (a queue that is not ordered) is left as it is.
local function release_hold(hold, owner, ik, ready, later, wake, now, key)
  if owner and redis.call('GET', hold) ~= owner then
    return
  end
  if redis.call('DEL', hold) == 0 then
    return
  end
  local due = tonumber(redis.call('ZSCORE', ready, key))
  local parked = due and due >= held_due
  if redis.call('EXISTS', ik) == 1 and not redis.call('ZSCORE', later, key) then
    if not due or parked then
      redis.call('ZADD', ready, now, key)
      redis.call('RPUSH', wake, key)
    end
  elseif parked then
    redis.call('ZREM', ready, key)
  end
end

-- grew records in the grown hash that queue had count shards before the
-- count that replaces it (appended to its ascending list: "2,4").
local function grew(grown, queue, count)
  local before = redis.call('HGET', grown, queue)
  if before then
    redis.call('HSET', grown, queue, before .. ',' .. count)
  else
    redis.call('HSET', grown, queue, count)
  end
end

-- ours reports whether the string cur, read from ik, can take items back:
-- it is missing, or the array batchq wrote (its count at nk records its
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
-- stored at ik (items put back were appended before the stored ones) and
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

-- oom returns the reply batchq's scripts give when v, a pcall's error
-- reply, is Redis refusing a write past maxmemory ("OOM command not
-- allowed ...", which Redis 6 puts behind the script's name and line),
-- the same text on every version; nil for any other reply.
local function oom(v)
  if string.find(v.err or '', 'OOM command not allowed', 1, true) then
    return redis.error_reply("OOM command not allowed when used memory > 'maxmemory'")
  end
end

-- merge_key appends the n items of payload (the items joined by commas,
-- after a comma and before a closing bracket: ",a,b]") to key, whose items
-- and count keys are ik and nk, and makes the key due. It costs the same
-- whatever the size of the stored array: one INCRBY raises the count, two
-- one-byte reads check the array, and SETRANGE overwrites its closing
-- bracket; a new array costs a SET, and makes the key due. With maxn and
-- maxb it refuses to take the array past maxn items or maxb bytes (and
-- never past max_items or max_string). merge.lua writes out its path
-- without a flush policy, for the producer's hot path: a change here goes
-- there too (TestMergeScriptsAgree).
--
-- An array batchq wrote always has its count beside it, and only batchq
-- writes counts. A value without one was written by another program,
-- however much it looks like an array ("[ ]", "[1,2]]"), and so is one that
-- is not the array its count records (it does not end at the recorded
-- length, or does not start with '['): another program replaced it. Both
-- are refused with NOTARRAY, and nothing is stored.
--
-- Without a flush policy (maxage 0) a new array is due at once: on the
-- ready index and the wake list. With one, a key is scheduled on the later
-- index, due maxage after its first item (or, with a quiet period, once no
-- item has come for quiet, up to maxage: the cap key ck keeps that bound),
-- and due at once when it holds fitems items or fbytes bytes. A key refused
-- for a value batchq did not write, or for its caps, is made due at once,
-- so that a worker moves the value away or drains the key. now is the
-- server's time (ms), as the producer knows it. It returns nil, or the
-- error reply, having stored nothing. When Redis is out of memory it
-- refuses the INCRBY, if nothing was written before it in the script: the
-- reply is Redis' OOM error, and merge_key writes nothing at all (a later
-- write would go through, since Redis lets a script that has written go
-- on).
local function merge_key(ik, nk, ck, ready, later, wake, key, payload, n, maxn, maxb, now, maxage, quiet, fitems, fbytes)
  if maxb <= 0 or maxb > max_string then
    maxb = max_string
  end
  if maxn <= 0 or maxn > max_items then
    maxn = max_items
  end
  local delta = n * unit + #payload - 1
  local v = redis.pcall('INCRBY', nk, delta)
  local err, items, len, new
  if type(v) == 'table' then
    if oom(v) then
      return oom(v)
    end
    err = redis.error_reply('NOTARRAY the count of the key is not an integer')
  elseif v == delta then
    -- No count: a new array, unless another program left a value here.
    items, len, new = n, #payload + 1, true
    if n > maxn or len > maxb then
      redis.call('DEL', nk)
      err = redis.error_reply('FULL 0 0')
    elseif not redis.call('SET', ik, '[' .. string.sub(payload, 2), 'NX') then
      redis.call('DEL', nk)
      err = redis.error_reply('NOTARRAY the key holds a value batchq did not write (it has no count)')
    end
  else
    items = math.floor((v - delta) / unit)
    len = v - delta - items * unit + 1
    if redis.pcall('GETRANGE', ik, len - 1, len) ~= ']' or redis.pcall('GETRANGE', ik, 0, 0) ~= '[' then
      redis.call('DECRBY', nk, delta)
      err = redis.error_reply('NOTARRAY the key holds a value batchq did not write (not the array its count records)')
    elseif items + n > maxn or len + #payload - 1 > maxb then
      redis.call('DECRBY', nk, delta)
      err = redis.error_reply('FULL ' .. items .. ' ' .. len)
    else
      redis.call('SETRANGE', ik, len - 1, payload)
      items, len = items + n, len + #payload - 1
    end
  end
  if err then
    make_due(ready, later, wake, now, key)
    return err
  end
  if maxage == 0 then
    if new and redis.call('ZADD', ready, 'NX', now, key) == 1 then
      redis.call('RPUSH', wake, key)
    end
    return nil
  end
  if (fitems > 0 and items >= fitems) or (fbytes > 0 and len >= fbytes) then
    make_due(ready, later, wake, now, key)
  elseif new then
    local due = now + maxage
    if quiet > 0 then
      due = now + math.min(quiet, maxage)
      -- The latest the key may be due at (the entry outlives it by a
      -- minute, then expires).
      redis.call('SET', ck, now + maxage, 'PX', maxage + 60000)
    end
    if redis.call('ZADD', later, 'NX', due, key) == 1 then
      redis.call('RPUSH', wake, '') -- a hint: the schedule changed
    end
  elseif quiet > 0 then
    -- Debounce: each item pushes a scheduled key's due time back by the
    -- quiet period, up to the cap set by its first. A key already due
    -- (full, or holding items put back) stays due.
    local due = redis.call('ZSCORE', later, key)
    if due then
      local cap = tonumber(redis.call('GET', ck) or due)
      redis.call('ZADD', later, 'XX', math.min(now + quiet, cap), key)
    end
  end
  return nil
end
