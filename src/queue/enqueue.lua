-- Enqueue a new ticket (KEYS[1] and ARGV[2] are the new ticket), unless the dedup key is
-- held by a ticket that is queued, dispatching or active.
-- ARGV: 5 kind, 6 room name, 7 dedup key, 8 now (ms), 9 '1' when a request follows, 10 request,
--       11 digest of the request (kind, room and request body), 12 week and 13 bucket of
--       the arrival, 14 when that week's arrival counters may be forgotten (ms)
-- Returns {ticket id, state, 0-based rank in pending or -1, 0 new | 1 duplicate | 2 conflict}:
-- a holder with the same digest is the same request (a duplicate); one with another digest is
-- a different request under the same key (a conflict). A holder written before digests were
-- stored has none and counts as the same request, as it did then.
local kind, room, dedup_key, now, digest = ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[11]

local holder = redis.call('HGET', dedup, dedup_key)
if holder then
  local state, held = unpack(redis.call('HMGET', prefix .. 'ticket:' .. holder, 'state', 'digest'))
  if state == 'queued' or state == 'dispatching' or state == 'active' then
    local answer = 1
    if held and held ~= digest then
      answer = 2
    end
    return {holder, state, redis.call('ZRANK', pending, holder) or -1, answer}
  end
end

local n = redis.call('INCR', seq)
redis.call('HSET', ticket, 'state', 'queued', 'kind', kind, 'room', room, 'dedup', dedup_key,
  'seq', n, 'enqueued_at', now, 'digest', digest)
if ARGV[9] == '1' then
  redis.call('HSET', ticket, 'request', ARGV[10])
end
redis.call('ZADD', pending, n, id)
redis.call('HSET', dedup, dedup_key, id)
redis.call('HINCRBY', demand, kind, 1)
redis.call('HINCRBY', queued, kind, 1)
-- The arrival pattern pre-warm learns from (src/prewarm.rs): a string of 10,080 saturating u16
-- counters (one-minute buckets) per kind and week, forgotten when no lookback reaches it.
local arrivals, kinds_seen = prefix .. 'arrivals:' .. kind .. ':' .. ARGV[12], prefix .. 'arrivals:kinds'
redis.call('BITFIELD', arrivals, 'OVERFLOW', 'SAT', 'INCRBY', 'u16', '#' .. ARGV[13], 1)
redis.call('PEXPIREAT', arrivals, ARGV[14])
redis.call('SADD', kinds_seen, kind)
redis.call('PEXPIREAT', kinds_seen, ARGV[14])
redis.call('SADD', room_key(room), id)
changed()
return {id, 'queued', redis.call('ZRANK', pending, id), 0}
