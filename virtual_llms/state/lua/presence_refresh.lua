-- Renew presence KEYS[1] for ARGV[2] seconds while it still names this stream (ARGV[1]).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return 0
