-- Shared by the fleet's scripts (state/base.py puts this file before each script that
-- names it with a first line "-- uses: lib/fleet.lua"). P is the broker's key prefix.

-- Tasks in flight on a backend: the sum of its slot hash's fields (one per requester hub),
-- dropping those of workers that are gone (no liveness key): a killed worker's slots free
-- themselves at the next read.
local function slot_count(P, key)
  local n = 0
  local fields = redis.call('HGETALL', key)
  for j = 1, #fields, 2 do
    if redis.call('EXISTS', P .. 'w:' .. fields[j]) == 1 then
      n = n + tonumber(fields[j + 1])
    else
      redis.call('HDEL', key, fields[j])
    end
  end
  return n
end

-- Tell the oldest waiter of LLM llm's queue that a slot may be free: PUBLISH the notice it
-- left when it joined to its hub. Waiters of workers that are gone are dropped on the way.
local function notify_head(P, llm)
  local q = P .. 'q:' .. llm
  for _ = 1, 16 do
    local head = redis.call('ZRANGE', q, 0, 0)[1]
    if not head then return 0 end
    local ch = redis.call('HGET', P .. 'qc:' .. llm, head)
    if ch and redis.call('EXISTS', P .. 'w:' .. ch) == 1 then
      local note = redis.call('HGET', P .. 'qp:' .. llm, head)
      if note and note ~= '' then redis.call('PUBLISH', ch, note) end
      return 1
    end
    redis.call('ZREM', q, head)
    redis.call('HDEL', P .. 'qc:' .. llm, head)
    redis.call('HDEL', P .. 'qp:' .. llm, head)
  end
  return 0
end

-- Give back one slot of a backend taken by requester hub reply (never below zero, never a
-- field that was dropped), and tell the queue's head.
local function slot_release(P, reply, llm, sid)
  local key = P .. 'f:' .. llm .. ':' .. sid
  local left = redis.call('HINCRBY', key, reply, -1)
  if left <= 0 then redis.call('HDEL', key, reply) end
  notify_head(P, llm)
end
