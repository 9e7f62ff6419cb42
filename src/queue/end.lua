-- active | dispatching -> ended. ARGV: 5 now (ms), 6 ttl (ms), 7 fencing token (optional).
-- Returns 1 or 0.
local refused = stale_fence(ARGV[7])
if refused then
  return refused
end
local state, kind, egress_id = unpack(redis.call('HMGET', ticket, 'state', 'kind', 'egress_id'))
if state == 'active' then
  redis.call('ZREM', active, id)
  if egress_id and redis.call('HGET', egress, egress_id) == id then
    redis.call('HDEL', egress, egress_id)
  end
elseif state == 'dispatching' then
  redis.call('ZREM', dispatching, id)
  decrement(demand, kind)
else
  return 0
end
finish('ended', ARGV[5], ARGV[6])
changed()
return 1
