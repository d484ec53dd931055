-- uses: lib/fleet.lua
-- Send one task of LLM ARGV[6] to the backend with the most free slots, in one round trip:
-- check the cached row's stamps, read which candidates hold a live stream and their tasks
-- in flight, keep the queue's order, take the slot, write the task's record and PUBLISH its
-- frame to the chosen stream's hub.
--   KEYS[1] the stamps hash         KEYS[2] the LLM's queue (a sorted set of waiter ids)
--   ARGV[1] P, the key prefix       ARGV[2] the row's name stamp field
--   ARGV[3] the stamp the cached row was read under
--   ARGV[4] the requester's hub channel     ARGV[5] the task id     ARGV[6] the LLM id
--   ARGV[7] the record's TTL        ARGV[8] the message's bytes without sid/epoch/tokenId
--           ('' = do not publish: the caller sends it)
--   ARGV[9] the waiter id of a queued caller ('' for a new request)
--   ARGV[10..] per candidate (in the caller's random order, so ties go to a random one):
--           session id, publisher token id, slots (0 = no limit), '1' if draining
-- A worker's liveness key (w:<hub>) is '1', or 'd' while it drains.
-- Returns {stamp, verdict, ...}:
--   'stale'                  the stamps moved: re-read the row, then route again
--   'none'                   no candidate holds a live stream
--   'full', position         every live candidate is full or draining, or waiters come
--                            first: queue (position: the caller's rank, or the queue's length)
--   'sent', i, presence, published   candidate i (1-based) got the task
local P = ARGV[1]
local st = redis.call('HMGET', KEYS[1], ARGV[2], '*')
local stamp = (st[1] or '') .. '/' .. (st[2] or '')
if stamp ~= ARGV[3] then return {stamp, 'stale'} end
local UNLIMITED = 1e15
local live, free_total = 0, 0
local best, best_free, best_busy, best_p, best_hub
local n = (#ARGV - 9) / 4
for i = 1, n do
  local base = 10 + (i - 1) * 4
  local p = redis.call('GET', P .. 's:' .. ARGV[base])
  local hub = p and string.match(p, '^(%S+)')
  local alive = hub and redis.call('GET', P .. 'w:' .. hub)
  if alive then
    live = live + 1
    -- A draining backend, or a stream held by a draining worker (drain.py), takes none.
    if ARGV[base + 3] ~= '1' and alive ~= 'd' then
      local busy = slot_count(P, P .. 'f:' .. ARGV[6] .. ':' .. ARGV[base])
      local max = tonumber(ARGV[base + 2])
      local free = UNLIMITED
      if max > 0 then free = max - busy end
      if free > 0 then
        free_total = free_total + free
        if best == nil or free > best_free or (free == best_free and busy < best_busy) then
          best, best_free, best_busy, best_p, best_hub = i, free, busy, p, hub
        end
      end
    end
  end
end
if live == 0 then return {stamp, 'none'} end
local waiting = redis.call('ZCARD', KEYS[2])
local waiter = ARGV[9]
local rank = waiting
if waiter ~= '' then rank = redis.call('ZRANK', KEYS[2], waiter) or waiting end
-- Waiters come first: the first free_total of them may take a slot.
if best == nil or rank >= free_total then return {stamp, 'full', rank} end
local base = 10 + (best - 1) * 4
local sid = ARGV[base]
redis.call('HINCRBY', P .. 'f:' .. ARGV[6] .. ':' .. sid, ARGV[4], 1)
redis.call('SET', P .. 't:' .. ARGV[5] .. ':' .. ARGV[base + 1],
  ARGV[4] .. ' ' .. ARGV[6] .. ' ' .. sid, 'EX', ARGV[7])
if waiter ~= '' and redis.call('ZREM', KEYS[2], waiter) == 1 then
  redis.call('HDEL', P .. 'qc:' .. ARGV[6], waiter)
  redis.call('HDEL', P .. 'qp:' .. ARGV[6], waiter)
  -- More slots free and more waiters: the next one's turn too.
  if free_total > 1 then notify_head(P, ARGV[6]) end
end
local published = 0
if ARGV[8] ~= '' and best_hub ~= ARGV[4] then
  -- The frame's message with this candidate's session, epoch and token spliced in: a map
  -- of the message's entries plus three (its header is one byte: a msgpack fixmap).
  local epoch = string.match(best_p, '^%S+ (%S+)')
  local msg = string.char(string.byte(ARGV[8], 1) + 3) .. string.sub(ARGV[8], 2) ..
    cmsgpack.pack('sid', sid, 'epoch', epoch, 'tokenId', tonumber(ARGV[base + 1]))
  redis.call('PUBLISH', best_hub, msg)
  published = 1
end
return {stamp, 'sent', best, best_p, published}
