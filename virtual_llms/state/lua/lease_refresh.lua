-- Renew lease KEYS[1] for ARGV[2] ms while it is still epoch ARGV[1]'s; re-create it if it
-- is gone (Redis restarted while the wake ran). 0 once another epoch holds it.
local v = redis.call('GET', KEYS[1])
if v and string.match(v, '^(%d+)') == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if not v then
  redis.call('SET', KEYS[1], ARGV[1] .. ' -', 'PX', ARGV[2])
  return 1
end
return 0
