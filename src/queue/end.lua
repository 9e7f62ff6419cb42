-- active | dispatching -> ended, failed or cancelled.
-- ARGV: 5 now (ms), 6 ttl (ms), 7 fencing token ('' for none), 8 final state ('ended',
-- 'failed' or 'cancelled'), 9 error (failed), 10 dead letters older than this (ms) are
-- dropped, 11 most dead letters kept, 12 egress id to record ('' for none: a dispatching
-- ticket whose egress was found and stopped). Returns 1 or 0.
local refused = stale_fence(ARGV[7])
if refused then
  return refused
end
local now, ttl, final = ARGV[5], ARGV[6], ARGV[8]
local state, kind, egress_id = unpack(redis.call('HMGET', ticket, 'state', 'kind', 'egress_id'))
if state == 'active' then
  redis.call('ZREM', active, id)
  if egress_id and redis.call('HGET', egress, egress_id) == id then
    redis.call('HDEL', egress, egress_id)
  end
elseif state == 'dispatching' then
  redis.call('ZREM', dispatching, id)
  decrement(demand, kind)
  if ARGV[12] ~= '' then
    redis.call('HSET', ticket, 'egress_id', ARGV[12])
    redis.call('SET', recorded_key(ARGV[12]), id, 'PX', ttl)
  end
  redis.call('HDEL', ticket, 'attempt', 'dispatching_at', 'unsettled_at')
else
  return 0
end
if final == 'failed' then
  redis.call('HSET', ticket, 'error', ARGV[9])
end
finish(final, now, ttl)
if final == 'failed' then
  dead_letter(now, ARGV[10], ARGV[11])
end
changed()
return 1
