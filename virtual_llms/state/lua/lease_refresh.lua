-- Renew lease KEYS[1] for ARGV[2] ms while it is still epoch ARGV[1]'s.
local v = redis.call('GET', KEYS[1])
if v and string.match(v, '^(%d+)') == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
