-- dispatching (by this attempt) -> queued, at the original place: the score in pending is
-- the enqueue sequence number kept in the ticket. The attempt's start time stays as
-- `last_attempt_at`, so that whoever claims the ticket next looks for an egress that attempt
-- may have started. ARGV: 5 attempt id, 6 fencing token (optional). Returns 1 or 0.
local refused = stale_fence(ARGV[6])
if refused then
  return refused
end
local state, kind, room, attempt, n, attempt_at = unpack(redis.call('HMGET', ticket, 'state',
  'kind', 'room', 'attempt', 'seq', 'dispatching_at'))
if state ~= 'dispatching' or attempt ~= ARGV[5] then
  return 0
end
redis.call('ZREM', dispatching, id)
redis.call('ZADD', pending, n, id)
redis.call('HINCRBY', queued, kind, 1)
redis.call('SADD', room_key(room), id)
redis.call('HSET', ticket, 'state', 'queued')
if attempt_at then
  redis.call('HSET', ticket, 'last_attempt_at', attempt_at)
end
redis.call('HDEL', ticket, 'attempt', 'dispatching_at')
changed()
return 1
