-- queued | dispatching -> failed, kept in the dead-letter set.
-- ARGV: 5 error, 6 now (ms), 7 ttl (ms), 8 dead letters older than this (ms) are dropped,
--       9 most dead letters kept, 10 fencing token (optional). Returns 1 or 0.
local refused = stale_fence(ARGV[10])
if refused then
  return refused
end
if not leave_unstarted() then
  return 0
end
redis.call('HSET', ticket, 'error', ARGV[5])
redis.call('HDEL', ticket, 'attempt', 'dispatching_at', 'unsettled_at')
finish('failed', ARGV[6], ARGV[7])
dead_letter(ARGV[6], ARGV[8], ARGV[9])
changed()
return 1
