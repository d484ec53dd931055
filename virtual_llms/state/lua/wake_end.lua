-- The leader of wake epoch ARGV[1] ends it: the lease KEYS[1] is released (if still its)
-- and, in the same step, its outcome ("<epoch> " .. ARGV[2]) recorded in KEYS[2] for
-- ARGV[3] seconds, so a waiter that missed the broadcast reads it after the fact; a failure
-- is also kept in KEYS[3] for ARGV[4] seconds ('0': not), for every later caller.
local v = redis.call('GET', KEYS[1])
if v and string.match(v, '^(%d+)') == ARGV[1] then redis.call('DEL', KEYS[1]) end
local record = ARGV[1] .. ' ' .. ARGV[2]
redis.call('SET', KEYS[2], record, 'EX', ARGV[3])
if tonumber(ARGV[4]) > 0 then redis.call('SET', KEYS[3], record, 'EX', ARGV[4]) end
return 1
