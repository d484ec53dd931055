-- Admit one request of a limited client token: rpm, tpm and max-concurrency checked and the
-- request counted in one round trip (virtual_llms/limits.py says why this is not the
-- `limits` package). rpm and tpm are GCRA windows of 60 s: a key holds the window's
-- "theoretical arrival time" in ms; each request moves it on by 60000/rpm, each token an
-- answer reported by 60000/tpm (limit_end.lua). The clock is Redis's own, so every worker
-- reads the same one.
-- KEYS: [1] rpm TAT, [2] tpm TAT, [3] in-flight zset (members "<hub channel> <call>")
-- ARGV: [1] rpm, [2] tpm, [3] max concurrency (0: no such limit), [4] this call's member,
--       [5] the liveness key prefix (a member whose worker died is dropped as it is read),
--       [6] the in-flight zset's backstop TTL in ms
-- Returns {admitted 0|1, refused by ("requests"|"tokens"|"concurrency"|""), retry ms,
--          requests remaining, requests reset ms, tokens remaining, tokens reset ms,
--          requests in flight (this one included when admitted)}
local WINDOW = 60000
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm, tpm, maxc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local refused, retry = '', 0
local rpm_next, rpm_left, rpm_reset = 0, 0, 0
local tpm_left, tpm_reset = 0, 0
local live = 0

if rpm > 0 then
  local step = WINDOW / rpm
  local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now)
  local nxt = tat + step
  if nxt - now > WINDOW + 0.001 then
    refused, retry = 'requests', nxt - now - WINDOW
    rpm_left, rpm_reset = 0, tat - now
  else
    rpm_next = nxt
    rpm_left = math.floor((WINDOW - (nxt - now)) / step + 1e-6)
    rpm_reset = nxt - now
  end
end

if tpm > 0 then
  local step = WINDOW / tpm
  local used = math.max(tonumber(redis.call('GET', KEYS[2]) or '0'), now) - now
  tpm_left = math.max(0, math.floor((WINDOW - used) / step + 1e-6))
  tpm_reset = used
  if tpm_left < 1 then
    if refused == '' then refused = 'tokens' end
    retry = math.max(retry, used - WINDOW + step)
  end
end

if maxc > 0 then
  for _, member in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
    local channel = string.match(member, '^(%S+)')
    if redis.call('EXISTS', ARGV[5] .. channel) == 1 then
      live = live + 1
    else
      redis.call('ZREM', KEYS[3], member)
    end
  end
  if live >= maxc then
    if refused == '' then refused = 'concurrency' end
    -- Nobody knows when a request in flight ends: try again in a second.
    retry = math.max(retry, 1000)
  end
end

if refused ~= '' then
  return {0, refused, math.ceil(retry), rpm_left, math.ceil(rpm_reset), tpm_left,
          math.ceil(tpm_reset), live}
end
if rpm > 0 then
  redis.call('SET', KEYS[1], string.format('%.3f', rpm_next), 'PX',
             math.ceil(rpm_next - now) + 1000)
end
if maxc > 0 then
  redis.call('ZADD', KEYS[3], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[6]))
  live = live + 1
end
return {1, '', 0, rpm_left, math.ceil(rpm_reset), tpm_left, math.ceil(tpm_reset), live}
