-- KEYS: 1 queued, 2 demand, 3 pending, 4 dispatching, 5 active, 6 dead. ARGV: 1 key prefix.
-- Returns {queued counts, demand counts, depth, oldest enqueued_at or -1, dispatching,
-- active, dead letters}: O(kinds + log n), no scan.
local oldest = -1
local head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
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
}
