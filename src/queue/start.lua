-- queued | dispatching -> active. ARGV: 5 egress id, 6 now (ms), 7 fencing token ('' for
-- none), 8 how long the egress stays recorded for this ticket (ms), 9 dead letters older than
-- this (ms) are dropped, 10 most dead letters kept.
-- Returns 1 started; 2 started, and the egress had already ended (the ticket is ended); 3 the
-- same but the egress had failed (the ticket is failed); 0 not queued or dispatching (nothing
-- changed); -1 the egress is recorded for another ticket (nothing changed).
local refused = stale_fence(ARGV[7])
if refused then
  return refused
end
local egress_id, now = ARGV[5], ARGV[6]
local owner = redis.call('GET', recorded_key(egress_id))
if owner and owner ~= id then
  return -1
end
if not leave_unstarted() then
  return 0
end
redis.call('HSET', ticket, 'state', 'active', 'egress_id', egress_id, 'started_at', now)
redis.call('HDEL', ticket, 'attempt', 'dispatching_at', 'unsettled_at')
redis.call('SET', recorded_key(egress_id), id, 'PX', ARGV[8])
local over_state, over_error = unpack(redis.call('HMGET', over_key(egress_id), 'state', 'error'))
if over_state then
  -- Its end was reported before its start was recorded.
  redis.call('DEL', over_key(egress_id))
  if over_state == 'failed' then
    redis.call('HSET', ticket, 'error', over_error or '')
    finish('failed', now, ARGV[8])
    dead_letter(now, ARGV[9], ARGV[10])
    changed()
    return 3
  end
  finish('ended', now, ARGV[8])
  changed()
  return 2
end
redis.call('ZADD', active, now, id)
redis.call('HSET', egress, egress_id, id)
changed()
return 1
