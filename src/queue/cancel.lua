-- queued -> cancelled. ARGV: 5 now (ms), 6 ttl (ms).
-- Returns the state found: 'queued' means cancelled now, '' means no such ticket.
local state, kind, room = unpack(redis.call('HMGET', ticket, 'state', 'kind', 'room'))
if not state then
  return ''
end
if state ~= 'queued' then
  return state
end
leave_pending(kind, room)
decrement(demand, kind)
finish('cancelled', ARGV[5], ARGV[6])
changed()
return 'queued'
