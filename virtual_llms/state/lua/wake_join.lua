-- Join the wake of one LLM: KEYS[1] its lease, KEYS[2] the lease's epoch counter, KEYS[3]
-- the record of the last wake's outcome ("<epoch> <ok> <status> <code> <message>"), KEYS[4]
-- the same record while a failure is remembered for every caller.
-- ARGV[1] the caller's hub, ARGV[2] the lease's TTL in ms, ARGV[3] the epoch the caller
-- joined before ('0': none).
-- Returns {'running', epoch} while a wake runs (the caller waits for its outcome);
-- {'outcome', record} for the wake the caller joined, decided while it was not listening,
-- or for a failure still remembered; else {'lead', epoch}: the caller took the lease and
-- wakes the LLM.
local v = redis.call('GET', KEYS[1])
if v then return {'running', string.match(v, '^(%d+)')} end
local joined = tonumber(ARGV[3])
if joined > 0 then
  local o = redis.call('GET', KEYS[3])
  if o and tonumber(string.match(o, '^(%d+)')) >= joined then return {'outcome', o} end
end
local failed = redis.call('GET', KEYS[4])
if failed then return {'outcome', failed} end
local epoch = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], 86400)
redis.call('SET', KEYS[1], epoch .. ' ' .. ARGV[1], 'PX', ARGV[2])
return {'lead', epoch}
