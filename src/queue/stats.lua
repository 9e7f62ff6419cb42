-- KEYS: 1 queued, 2 demand, 3 pending, 4 dispatching, 5 active, 6 dead, 7 dedup, 8 egress.
-- ARGV: 1 key prefix, 2 events channel, 3 queue name.
-- Returns {queued counts, demand counts, depth, oldest enqueued_at or -1, dispatching,
-- active, dead letters, ids removed as lost}: O(kinds + log n), no scan, unless the head of
-- the FIFO is a lost ticket (see repair.lua): then it is repaired first, so that neither the
-- oldest wait nor the counters keep it.
local removed = {}
local head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
if head and lost(ARGV[1], head) then
  removed = repair({prefix = ARGV[1], pending = KEYS[3], dispatching = KEYS[4],
    active = KEYS[5], queued = KEYS[1], demand = KEYS[2], dedup = KEYS[7], egress = KEYS[8],
    channel = ARGV[2], queue = ARGV[3]})
  head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
end
local oldest = -1
if head then
  oldest = tonumber(redis.call('HGET', ARGV[1] .. 'ticket:' .. head, 'enqueued_at') or '-1')
end
return {
  redis.call('HGETALL', KEYS[1]),
  redis.call('HGETALL', KEYS[2]),
  redis.call('ZCARD', KEYS[3]),
  oldest,
  redis.call('ZCARD', KEYS[4]),
  redis.call('ZCARD', KEYS[5]),
  redis.call('ZCARD', KEYS[6]),
  removed,
}
