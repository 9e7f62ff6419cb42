-- Marks the attempt of a dispatching ticket as of unknown outcome (its answer was lost, or it
-- was in flight when its dispatcher died): only such an attempt may be matched by an
-- `egress_started` webhook. ARGV: 5 attempt id, 6 now (ms), 7 fencing token (optional).
-- Returns 1 or 0.
local refused = stale_fence(ARGV[7])
if refused then
  return refused
end
local state, attempt = unpack(redis.call('HMGET', ticket, 'state', 'attempt'))
if state ~= 'dispatching' or attempt ~= ARGV[5] then
  return 0
end
redis.call('HSETNX', ticket, 'unsettled_at', ARGV[6])
return 1
