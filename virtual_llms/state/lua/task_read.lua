-- uses: lib/fleet.lua
-- Read (ARGV[2] = '0', renewing its TTL to ARGV[3]) or take (ARGV[2] = '1') the open task's
-- record KEYS[1]: "<requester hub> [<llm id> <session>]". If the requester's worker died
-- (no liveness key), the record is dropped and nil returned, as for a client that left.
-- Else the answer (ARGV[4], the channel layer's bytes; '' for none) is published to the
-- requester's hub, in the same round trip; a taken task gives its backend's slot back.
-- Prefix ARGV[1].
local P = ARGV[1]
local v
if ARGV[2] == '1' then v = redis.call('GETDEL', KEYS[1])
else v = redis.call('GETEX', KEYS[1], 'EX', ARGV[3]) end
if not v then return nil end
local reply, llm, sid = string.match(v, '^(%S+) ?(%S*) ?(%S*)')
if redis.call('EXISTS', P .. 'w:' .. reply) == 0 then
  redis.call('DEL', KEYS[1])
  return nil
end
if ARGV[4] ~= '' then redis.call('PUBLISH', reply, ARGV[4]) end
if ARGV[2] == '1' and sid ~= '' then slot_release(P, reply, llm, sid) end
return v
