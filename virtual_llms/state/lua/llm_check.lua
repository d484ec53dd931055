-- A row's three stamps (name ARGV[1], session ARGV[2], everything '*') from the stamps hash
-- KEYS[1] and, in the same round trip when ARGV[4] = '1', who holds the session's stream
-- (presence KEYS[2], believed while its worker is alive: liveness prefix ARGV[3]).
local st = redis.call('HMGET', KEYS[1], ARGV[1], ARGV[2], '*')
local stamp = (st[1] or '') .. '/' .. (st[2] or '') .. '/' .. (st[3] or '')
local p = false
if ARGV[4] == '1' then
  p = redis.call('GET', KEYS[2])
  if p and redis.call('EXISTS', ARGV[3] .. string.match(p, '^(%S+)')) == 0 then p = false end
end
return {stamp, p}
