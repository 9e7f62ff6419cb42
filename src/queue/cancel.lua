-- queued -> cancelled; on a dispatching ticket the intent is recorded (`cancel_requested`) and
-- the dispatcher cancels it once its attempt is settled (stopping the egress it started).
-- ARGV: 5 now (ms), 6 ttl (ms).
-- Returns the state found: 'queued' means cancelled now, 'dispatching' that the intent is
-- recorded, '' that there is no such ticket; any other state changed nothing.
local state, kind, room = unpack(redis.call('HMGET', ticket, 'state', 'kind', 'room'))
if not state then
  return ''
end
if state == 'dispatching' then
  if redis.call('HSETNX', ticket, 'cancel_requested', ARGV[5]) == 1 then
    changed()
  end
  return state
end
if state ~= 'queued' then
  return state
end
leave_pending(kind, room)
decrement(demand, kind)
finish('cancelled', ARGV[5], ARGV[6])
changed()
return 'queued'
