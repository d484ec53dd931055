-- uses: lib/fleet.lua
-- Waiter ARGV[2] leaves LLM ARGV[1]'s queue (its client left, or it timed out); the new
-- head hears of it, in case a slot was freed for the one that left. Prefix ARGV[3].
local P, llm, waiter = ARGV[3], ARGV[1], ARGV[2]
local was = redis.call('ZREM', P .. 'q:' .. llm, waiter)
redis.call('HDEL', P .. 'qc:' .. llm, waiter)
redis.call('HDEL', P .. 'qp:' .. llm, waiter)
if was == 1 then notify_head(P, llm) end
return was
