-- uses: lib/fleet.lua
-- The whole fleet in one round trip (metrics.py's gauges, read at each scrape): for each LLM,
-- its queue's length, and for each of its backends whether its session holds a stream on a
-- live worker and its tasks in flight.
--   ARGV[1] P, the key prefix      ARGV[2] how many LLMs
--   then per LLM: its id, how many backends, and their session ids
-- Returns, per LLM in order: the queue's length, then per backend: held (0 no live stream,
-- 1 held, 2 held by a draining worker) and tasks in flight.
local P = ARGV[1]
local out = {}
local i = 3
for _ = 1, tonumber(ARGV[2]) do
  local llm = ARGV[i]
  local n = tonumber(ARGV[i + 1])
  out[#out + 1] = redis.call('ZCARD', P .. 'q:' .. llm)
  for b = 1, n do
    local sid = ARGV[i + 1 + b]
    local held = 0
    local p = redis.call('GET', P .. 's:' .. sid)
    local hub = p and string.match(p, '^(%S+)')
    local alive = hub and redis.call('GET', P .. 'w:' .. hub)
    if alive then held = alive == 'd' and 2 or 1 end
    out[#out + 1] = held
    out[#out + 1] = slot_count(P, P .. 'f:' .. llm .. ':' .. sid)
  end
  i = i + 2 + n
end
return out
