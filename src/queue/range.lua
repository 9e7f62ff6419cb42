-- The first ARGV[2] tickets of the sorted set KEYS[1], lowest score first ('asc') or
-- highest first ('desc'), read in one consistent step. ARGV: 1 key prefix, 2 count,
-- 3 'asc' | 'desc'. Returns {{id, HGETALL}, ...}, skipping tickets whose hash has expired.
local ids
if ARGV[3] == 'desc' then
  ids = redis.call('ZREVRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)
else
  ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)
end
local tickets = {}
for _, ticket_id in ipairs(ids) do
  local fields = redis.call('HGETALL', ARGV[1] .. 'ticket:' .. ticket_id)
  if #fields > 0 then
    tickets[#tickets + 1] = {ticket_id, fields}
  end
end
return tickets
