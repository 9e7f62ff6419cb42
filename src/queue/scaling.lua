-- The replica model's input from Redis, in one round trip: the demand counters, and the kinds
-- of the tickets started after a given time (which a fleet snapshot may not show yet).
-- KEYS: 1 demand, 2 active, 3 pending, 4 dispatching, 5 queued, 6 dedup, 7 egress.
-- ARGV: 1 key prefix, 2 started after this (ms, exclusive) or '' for none, 3 most starts
--       read, 4 events channel, 5 queue name, 6.. the arrival buckets pre-warm asks for,
--       grouped by week: week, number of buckets n, then n bucket numbers; again per week.
-- Returns {demand counts, {kind of each start, oldest start first}, ids removed as lost,
-- {{kind, {count of each bucket asked, in order}} per kind ever counted}}.
-- O(kinds + log n + starts read + buckets asked); a lost ticket at the head of the FIFO is
-- repaired first
-- (see repair.lua), so that the demand does not keep counting it.
local removed = {}
local head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
if head and lost(ARGV[1], head) then
  removed = repair({prefix = ARGV[1], pending = KEYS[3], dispatching = KEYS[4],
    active = KEYS[2], queued = KEYS[5], demand = KEYS[1], dedup = KEYS[6], egress = KEYS[7],
    channel = ARGV[4], queue = ARGV[5]})
end
local kinds = {}
if ARGV[2] ~= '' then
  local started = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[2], '+inf', 'LIMIT', 0,
    tonumber(ARGV[3]))
  for _, ticket_id in ipairs(started) do
    local kind = redis.call('HGET', ARGV[1] .. 'ticket:' .. ticket_id, 'kind')
    if kind then
      kinds[#kinds + 1] = kind
    end
  end
end
local arrivals = {}
if ARGV[6] then
  for _, kind in ipairs(redis.call('SMEMBERS', ARGV[1] .. 'arrivals:kinds')) do
    local counts = {}
    local i = 6
    while ARGV[i] do
      local key, n = ARGV[1] .. 'arrivals:' .. kind .. ':' .. ARGV[i], tonumber(ARGV[i + 1])
      if redis.call('EXISTS', key) == 1 then
        local fields = {}
        for j = 1, n do
          fields[#fields + 1] = 'GET'
          fields[#fields + 1] = 'u16'
          fields[#fields + 1] = '#' .. ARGV[i + 1 + j]
        end
        for _, count in ipairs(redis.call('BITFIELD', key, unpack(fields))) do
          counts[#counts + 1] = count
        end
      else
        for _ = 1, n do
          counts[#counts + 1] = 0
        end
      end
      i = i + 2 + n
    end
    arrivals[#arrivals + 1] = {kind, counts}
  end
end
return {redis.call('HGETALL', KEYS[1]), kinds, removed, arrivals}
