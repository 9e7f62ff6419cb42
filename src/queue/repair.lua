-- Repair of tickets whose hash is gone: evicted by a Redis whose `maxmemory-policy` is not
-- `noeviction`, or deleted by hand. Prepended to the reading scripts that can meet one
-- (range, stats, scaling input); `repair` is called only when a ticket is found lost.
--
-- A lost ticket's kind is gone with its hash, so the counters cannot be decremented: they are
-- recounted from the tickets that survive. That reads every queued, dispatching and active
-- ticket (O(tickets)), once, on a path that a healthy Redis never takes. Lost ids are also
-- dropped from the dedup and egress indexes; a `room:<name>` set may keep the id (its room is
-- gone with the hash too), which only costs a lookup that finds nothing.

-- True when the ticket's hash is gone (or lost its kind, which every ticket is written with).
local function lost(prefix, ticket_id)
  return redis.call('HEXISTS', prefix .. 'ticket:' .. ticket_id, 'kind') == 0
end

-- Replaces a counter hash with `counts` (non-zero kinds only, as everywhere else).
local function rewrite_counts(hash, counts)
  redis.call('DEL', hash)
  for kind, count in pairs(counts) do
    redis.call('HSET', hash, kind, count)
  end
end

-- Drops the fields of an index hash whose value is one of the `gone` ids.
local function drop_index_entries(hash, gone)
  local fields = redis.call('HGETALL', hash)
  for i = 1, #fields, 2 do
    if gone[fields[i + 1]] then
      redis.call('HDEL', hash, fields[i])
    end
  end
end

-- keys: {prefix, pending, dispatching, active, queued, demand, dedup, egress, channel, queue}.
-- Removes every lost ticket from pending, dispatching and active, recounts `queued` and
-- `demand`, announces the change, and returns the ids removed.
local function repair(keys)
  local removed, gone = {}, {}
  local queued_counts, demand_counts = {}, {}
  local function sweep(set, counters)
    for _, member in ipairs(redis.call('ZRANGE', set, 0, -1)) do
      local kind = redis.call('HGET', keys.prefix .. 'ticket:' .. member, 'kind')
      if kind then
        for _, counts in ipairs(counters) do
          counts[kind] = (counts[kind] or 0) + 1
        end
      else
        redis.call('ZREM', set, member)
        removed[#removed + 1] = member
        gone[member] = true
      end
    end
  end
  sweep(keys.pending, {queued_counts, demand_counts})
  sweep(keys.dispatching, {demand_counts})
  sweep(keys.active, {})
  rewrite_counts(keys.queued, queued_counts)
  rewrite_counts(keys.demand, demand_counts)
  if #removed > 0 then
    drop_index_entries(keys.dedup, gone)
    drop_index_entries(keys.egress, gone)
    redis.call('PUBLISH', keys.channel, keys.queue)
  end
  return removed
end

