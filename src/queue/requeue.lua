-- dispatching (by this attempt) -> queued, at the original place: the score in pending is
-- the enqueue sequence number kept in the ticket. Only for an attempt that certainly started
-- nothing, or can start nothing any more: no later attempt looks for its egress.
-- ARGV: 5 attempt id, 6 fencing token (optional). Returns 1 or 0.
local refused = stale_fence(ARGV[6])
if refused then
  return refused
end
local state, kind, room, attempt, n = unpack(redis.call('HMGET', ticket, 'state', 'kind', 'room',
  'attempt', 'seq'))
if state ~= 'dispatching' or attempt ~= ARGV[5] then
  return 0
end
redis.call('ZREM', dispatching, id)
redis.call('ZADD', pending, n, id)
redis.call('HINCRBY', queued, kind, 1)
redis.call('SADD', room_key(room), id)
redis.call('HSET', ticket, 'state', 'queued')
redis.call('HDEL', ticket, 'attempt', 'dispatching_at', 'unsettled_at')
changed()
return 1
