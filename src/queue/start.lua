-- queued | dispatching -> active. ARGV: 5 egress id, 6 now (ms), 7 fencing token (optional).
-- Returns 1 or 0.
local refused = stale_fence(ARGV[7])
if refused then
  return refused
end
if not leave_unstarted() then
  return 0
end
redis.call('ZADD', active, ARGV[6], id)
redis.call('HSET', ticket, 'state', 'active', 'egress_id', ARGV[5], 'started_at', ARGV[6])
redis.call('HSET', egress, ARGV[5], id)
changed()
return 1
