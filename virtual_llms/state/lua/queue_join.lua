-- Join LLM ARGV[1]'s queue as waiter ARGV[2] of hub ARGV[3], leaving the notice ARGV[4]
-- (the channel layer's bytes) to be published to that hub when a slot may be free; at most
-- ARGV[5] waiters; the queue's keys live ARGV[6] seconds past the last join. Prefix ARGV[7].
-- Returns the waiter's position (0: next), or -1 when the queue is full.
local P, llm, waiter = ARGV[7], ARGV[1], ARGV[2]
local q = P .. 'q:' .. llm
if redis.call('ZCARD', q) >= tonumber(ARGV[5]) then return -1 end
local seq = redis.call('INCR', P .. 'qn:' .. llm)
redis.call('ZADD', q, seq, waiter)
redis.call('HSET', P .. 'qc:' .. llm, waiter, ARGV[3])
redis.call('HSET', P .. 'qp:' .. llm, waiter, ARGV[4])
for _, key in ipairs({q, P .. 'qn:' .. llm, P .. 'qc:' .. llm, P .. 'qp:' .. llm}) do
  redis.call('EXPIRE', key, ARGV[6])
end
return redis.call('ZRANK', q, waiter)
