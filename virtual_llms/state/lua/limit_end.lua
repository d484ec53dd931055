-- A limited client token's request ended: its in-flight member goes, and the tokens its
-- answer reported move the tpm window on (GCRA, see limit_admit.lua).
-- KEYS: [1] tpm TAT, [2] in-flight zset
-- ARGV: [1] the call's member ("" if it held none), [2] tokens reported, [3] tpm (0: none)
if ARGV[1] ~= '' then
  redis.call('ZREM', KEYS[2], ARGV[1])
end
local tokens, tpm = tonumber(ARGV[2]), tonumber(ARGV[3])
if tokens > 0 and tpm > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now) + tokens * 60000 / tpm
  redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1000)
end
return 1
