-- uses: lib/fleet.lua
-- The whole fleet in one round trip (metrics.py's gauges at each scrape, the admin's Fleet
-- page at each refresh): for each LLM, its queue's length, and for each of its backends
-- whether its session holds a stream on a live worker and its tasks in flight.
--   ARGV[1] P, the key prefix      ARGV[2] '1': with details (the Fleet page), else '0'
--   ARGV[3] how many LLMs
--   then per LLM: its id, how many backends, and their session ids
-- Returns, per LLM in order: the queue's length, with details the value of its wake lease
-- ('' when no wake runs), then per backend: held (0 no live stream, 1 held, 2 held by a
-- draining worker), tasks in flight, and with details its presence record ('' when not held).
local P = ARGV[1]
local detail = ARGV[2] == '1'
local out = {}
local i = 4
for _ = 1, tonumber(ARGV[3]) do
  local llm = ARGV[i]
  local n = tonumber(ARGV[i + 1])
  out[#out + 1] = redis.call('ZCARD', P .. 'q:' .. llm)
  if detail then out[#out + 1] = redis.call('GET', P .. 'l:wake:' .. llm) or '' end
  for b = 1, n do
    local sid = ARGV[i + 1 + b]
    local held = 0
    local p = redis.call('GET', P .. 's:' .. sid)
    local hub = p and string.match(p, '^(%S+)')
    local alive = hub and redis.call('GET', P .. 'w:' .. hub)
    if alive then held = alive == 'd' and 2 or 1 end
    out[#out + 1] = held
    out[#out + 1] = slot_count(P, P .. 'f:' .. llm .. ':' .. sid)
    if detail then out[#out + 1] = (alive and p) or '' end
  end
  i = i + 2 + n
end
return out
