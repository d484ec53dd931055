-- Release lease KEYS[1] while it is still epoch ARGV[1]'s.
local v = redis.call('GET', KEYS[1])
if v and string.match(v, '^(%d+)') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
