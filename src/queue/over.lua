-- An egress ended (its `egress_ended` webhook) that no ticket of this queue records as active:
-- when its start is being recorded right now, the ticket is returned so that the caller ends
-- it; otherwise the end is kept, so that the start, when it is recorded, ends at once.
-- KEYS: 1 egress index, 2 the egress's recorded key, 3 its over key.
-- ARGV: 1 egress id, 2 final state ('ended' or 'failed'), 3 error, 4 ttl of the note (ms).
-- Returns the id of the ticket holding the egress, or ''.
local owner = redis.call('HGET', KEYS[1], ARGV[1]) or redis.call('GET', KEYS[2])
if owner then
  return owner
end
redis.call('HSET', KEYS[3], 'state', ARGV[2], 'error', ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[4])
return ''
