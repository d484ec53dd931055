-- Read (ARGV[2] = '0', renewing its TTL to ARGV[3]) or take (ARGV[2] = '1') the open task's
-- record KEYS[1]. It starts with the requester's hub channel: if that worker died (no
-- liveness key under the prefix ARGV[1]), the record is dropped and nil returned, as for a
-- client that left. Else the answer (ARGV[4], the channel layer's bytes; '' for none) is
-- published to that channel, in the same round trip.
local v
if ARGV[2] == '1' then v = redis.call('GETDEL', KEYS[1])
else v = redis.call('GETEX', KEYS[1], 'EX', ARGV[3]) end
if not v then return nil end
local reply = string.match(v, '^(%S+)')
if redis.call('EXISTS', ARGV[1] .. reply) == 0 then
  redis.call('DEL', KEYS[1])
  return nil
end
if ARGV[4] ~= '' then redis.call('PUBLISH', reply, ARGV[4]) end
return v
