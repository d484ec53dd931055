-- Renew presence KEYS[1] for ARGV[2] seconds while it still names this stream (ARGV[1]);
-- re-create it if it is gone (Redis restarted, or flushed): the stream is still here. 0 once
-- another stream holds the session.
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return 1
end
return 0
