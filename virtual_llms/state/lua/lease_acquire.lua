-- Take lease KEYS[1] for ARGV[1] (holder) for ARGV[2] ms if nobody holds it; its epoch
-- comes from the counter KEYS[2], so every lease of one key has a new epoch.
if redis.call('EXISTS', KEYS[1]) == 1 then return nil end
local epoch = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], 86400)
redis.call('SET', KEYS[1], epoch .. ' ' .. ARGV[1], 'PX', ARGV[2])
return epoch
