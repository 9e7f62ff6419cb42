-- The first ARGV[2] tickets of the sorted set KEYS[1], lowest score first ('asc') or
-- highest first ('desc'), read in one consistent step.
-- KEYS: 1 the set read, 2 pending, 3 dispatching, 4 active, 5 queued, 6 demand, 7 dedup,
--       8 egress. ARGV: 1 key prefix, 2 count, 3 'asc' | 'desc', 4 events channel,
--       5 queue name, 6 '1' when the set is pending: a lost ticket there is repaired (see
--       repair.lua) rather than skipped, so that it never holds the head of a strict queue.
-- Returns {{{id, HGETALL}, ...}, {ids removed as lost}}; elsewhere (dead letters) tickets
-- whose hash has expired are skipped.
local function read()
  local ids
  if ARGV[3] == 'desc' then
    ids = redis.call('ZREVRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)
  else
    ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)
  end
  local tickets, missing = {}, false
  for _, ticket_id in ipairs(ids) do
    local fields = redis.call('HGETALL', ARGV[1] .. 'ticket:' .. ticket_id)
    if lost(ARGV[1], ticket_id) then
      missing = true
    else
      tickets[#tickets + 1] = {ticket_id, fields}
    end
  end
  return tickets, missing
end

local tickets, missing = read()
local removed = {}
if missing and ARGV[6] == '1' then
  removed = repair({prefix = ARGV[1], pending = KEYS[2], dispatching = KEYS[3],
    active = KEYS[4], queued = KEYS[5], demand = KEYS[6], dedup = KEYS[7], egress = KEYS[8],
    channel = ARGV[4], queue = ARGV[5]})
  tickets = read()
end
return {tickets, removed}
