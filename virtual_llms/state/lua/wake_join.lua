-- Join the wake of one LLM: KEYS[1] its lease, KEYS[2] the lease's epoch counter, KEYS[3]
-- the record of the last wake's outcome ("<epoch> <ok> <status> <code> <decided ms>
-- <message>"), KEYS[4] the same record while a failure is remembered for every caller.
-- ARGV[1] the caller's hub, ARGV[2] the lease's TTL in ms, ARGV[3] the epoch the caller
-- joined before ('0': none), ARGV[4] when the caller's request arrived (ms since the epoch).
-- Returns {'running', epoch} while a wake runs (the caller waits for its outcome);
-- {'outcome', record} for the wake the caller joined, decided while it was not listening,
-- for a wake that failed after the caller's request arrived (it was waiting for that wake,
-- whether or not it had joined it yet), or for a failure still remembered; else
-- {'lead', epoch}: the caller took the lease and wakes the LLM.
local v = redis.call('GET', KEYS[1])
if v then return {'running', string.match(v, '^(%d+)')} end
local joined = tonumber(ARGV[3])
local o = redis.call('GET', KEYS[3])
if o then
  local epoch, ok, decided = string.match(o, '^(%d+) (%d) %S+ %S+ (%d+)')
  -- A record that does not read so (one written before this format) is not an outcome.
  if epoch then
    if joined > 0 and tonumber(epoch) >= joined then return {'outcome', o} end
    if ok == '0' and tonumber(decided) >= tonumber(ARGV[4]) then return {'outcome', o} end
  end
end
local failed = redis.call('GET', KEYS[4])
if failed then return {'outcome', failed} end
local epoch = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], 86400)
-- "<epoch> <holder> <since ms>": the admin's Fleet page shows the wake's age from the third.
redis.call('SET', KEYS[1], epoch .. ' ' .. ARGV[1] .. ' ' .. ARGV[4], 'PX', ARGV[2])
return {'lead', epoch}
