-- In-flight task counts of backends: KEYS are their slot hashes (field: the requester's hub
-- channel, value: its tasks in flight there). Fields of dead workers (no liveness key under
-- the prefix ARGV[1]) are dropped as they are read: a killed worker's slots free themselves.
local out = {}
for i = 1, #KEYS do
  local n = 0
  local fields = redis.call('HGETALL', KEYS[i])
  for j = 1, #fields, 2 do
    if redis.call('EXISTS', ARGV[1] .. fields[j]) == 1 then
      n = n + tonumber(fields[j + 1])
    else
      redis.call('HDEL', KEYS[i], fields[j])
    end
  end
  out[i] = n
end
return out
