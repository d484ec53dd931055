-- Give every field in ARGV a stamp never used before (the counter KEYS[2]) in the stamps
-- hash KEYS[1]. Both keys live a day past the last write: a cached row is trusted for
-- seconds only (rowcache.ROW_CACHE_SECONDS), so a counter that starts over after a quiet
-- day can never make an old stamp current again.
local s = redis.call('INCR', KEYS[2])
for i = 1, #ARGV do redis.call('HSET', KEYS[1], ARGV[i], s) end
redis.call('EXPIRE', KEYS[1], 86400)
redis.call('EXPIRE', KEYS[2], 86400)
return s
