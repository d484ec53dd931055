-- Who holds session KEYS[1]'s stream, if its worker is alive.
-- ARGV[1]: the prefix of worker liveness keys.
local p = redis.call('GET', KEYS[1])
if not p then return nil end
local ch = string.match(p, '^(%S+)')
if redis.call('EXISTS', ARGV[1] .. ch) == 1 then return p end
return nil
