-- queued -> dispatching. ARGV: 5 attempt id, 6 now (ms).
-- Returns the ticket's fields after the change (HGETALL), or an empty array.
local state, kind, room = unpack(redis.call('HMGET', ticket, 'state', 'kind', 'room'))
if state ~= 'queued' then
  return {}
end
leave_pending(kind, room)
redis.call('ZADD', dispatching, ARGV[6], id)
redis.call('HSET', ticket, 'state', 'dispatching', 'attempt', ARGV[5], 'dispatching_at', ARGV[6])
changed()
return redis.call('HGETALL', ticket)
