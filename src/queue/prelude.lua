-- Prelude of every transition script: the script's own body is appended after it.
--
-- KEYS: 1 ticket hash, 2 pending, 3 dispatching, 4 active, 5 dead, 6 demand, 7 queued,
--       8 dedup, 9 egress, 10 seq, 11 fence (the dispatcher lease's fencing counter)
-- ARGV: 1 key prefix, 2 ticket id, 3 events channel, 4 queue name, 5.. the script's own
--
-- The only keys built here rather than passed are `room:<name>` sets and the hash of a
-- ticket found through the dedup hash: both start with the key prefix, hash tag included,
-- so they live in the same cluster slot as KEYS.
local ticket, pending, dispatching, active, dead = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local demand, queued, dedup, egress, seq = KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local fence = KEYS[11]
local prefix, id, channel, queue = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

local function room_key(room)
  return prefix .. 'room:' .. room
end

-- Counters hold non-zero kinds only, so a missing field is zero and none goes below it.
local function decrement(hash, field)
  local value = tonumber(redis.call('HGET', hash, field) or '0')
  if value <= 1 then
    redis.call('HDEL', hash, field)
  else
    redis.call('HINCRBY', hash, field, -1)
  end
end

-- A queued ticket leaves the pending set, the queued counter and its room's index.
local function leave_pending(kind, room)
  redis.call('ZREM', pending, id)
  decrement(queued, kind)
  redis.call('SREM', room_key(room), id)
end

-- A ticket not started yet (queued or dispatching) leaves its set and the demand; false when
-- it is in any other state (nothing changed).
local function leave_unstarted()
  local state, kind, room = unpack(redis.call('HMGET', ticket, 'state', 'kind', 'room'))
  if state == 'queued' then
    leave_pending(kind, room)
  elseif state == 'dispatching' then
    redis.call('ZREM', dispatching, id)
  else
    return false
  end
  decrement(demand, kind)
  return true
end

-- A finished ticket frees its dedup key (only if the key still names it) and expires.
local function finish(state, now, ttl_ms)
  redis.call('HSET', ticket, 'state', state, 'ended_at', now)
  local key = redis.call('HGET', ticket, 'dedup')
  if key and redis.call('HGET', dedup, key) == id then
    redis.call('HDEL', dedup, key)
  end
  redis.call('PEXPIRE', ticket, ttl_ms)
end

-- The dispatcher passes the fencing token of its lease with each of its writes: a token that
-- is not the current one means a newer dispatcher took the lease over, and the write is
-- refused with a FENCED error. Writes of anyone else pass no token (nil or '').
local function stale_fence(token)
  if token == nil or token == '' or redis.call('GET', fence) == token then
    return nil
  end
  return redis.error_reply('FENCED a newer dispatcher holds the lease')
end

-- A failed ticket is kept in the dead-letter set: as long as its hash, and only the newest.
local function dead_letter(now, oldest, kept)
  redis.call('ZADD', dead, now, id)
  redis.call('ZREMRANGEBYSCORE', dead, '-inf', '(' .. oldest)
  redis.call('ZREMRANGEBYRANK', dead, 0, -1 - tonumber(kept))
end

-- The record of which ticket an egress was started for: kept after the ticket ends, so that
-- an egress recorded once is never adopted by another ticket.
local function recorded_key(egress_id)
  return prefix .. 'recorded:' .. egress_id
end

-- An egress that ended before any ticket recorded it (its `egress_ended` webhook came first).
local function over_key(egress_id)
  return prefix .. 'egress_over:' .. egress_id
end

local function changed()
  redis.call('PUBLISH', channel, queue)
end

