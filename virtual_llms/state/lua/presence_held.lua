-- Which of the sessions named by KEYS (presence keys) hold a stream on a live worker
-- (liveness prefix ARGV[1]): 1 or 0 each, in order.
local out = {}
for i = 1, #KEYS do
  local p = redis.call('GET', KEYS[i])
  out[i] = 0
  if p and redis.call('EXISTS', ARGV[1] .. string.match(p, '^(%S+)')) == 1 then out[i] = 1 end
end
return out
