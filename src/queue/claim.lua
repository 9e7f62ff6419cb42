-- queued -> dispatching. ARGV: 5 attempt id, 6 now (ms), 7 fencing token (optional).
-- Returns the ticket's fields after the change (HGETALL), or an empty array.
local refused = stale_fence(ARGV[7])
if refused then
  return refused
end
local state, kind, room = unpack(redis.call('HMGET', ticket, 'state', 'kind', 'room'))
if state ~= 'queued' then
  return {}
end
leave_pending(kind, room)
redis.call('ZADD', dispatching, ARGV[6], id)
redis.call('HSET', ticket, 'state', 'dispatching', 'attempt', ARGV[5], 'dispatching_at', ARGV[6])
changed()
return redis.call('HGETALL', ticket)
