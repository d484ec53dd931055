-- Waiter ARGV[1]'s position in queue KEYS[1] (0: next), or -1 if it is not in it; and the
-- queue's length.
local r = redis.call('ZRANK', KEYS[1], ARGV[1])
return {r or -1, redis.call('ZCARD', KEYS[1])}
