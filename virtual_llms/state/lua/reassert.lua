-- A worker writes again what it holds after Redis lost it (a restart, a flush), only where
-- nothing is (a newer stream or record wins). ARGV[1] the prefix, ARGV[2] this hub's channel,
-- ARGV[3] the presence TTL (s), ARGV[4] the task TTL (s), ARGV[5] the number of streams, then
-- per stream: session id, presence value ("<channel> <epoch>"); then per task: key suffix
-- ("<task id>:<token id>"), record ("<reply>" or "<reply> <llm id> <sid>"). A routed task's
-- record names the backend whose slot it holds (state/routing.py), so this hub's field of
-- each backend's slot hash is set to the number of its tasks there.
-- Returns {streams written, tasks written}.
local P, me = ARGV[1], ARGV[2]
local n = tonumber(ARGV[5])
local streams, tasks = 0, 0
for i = 0, n - 1 do
  if redis.call('SET', P .. 's:' .. ARGV[6 + 2 * i], ARGV[7 + 2 * i], 'EX', ARGV[3], 'NX') then
    streams = streams + 1
  end
end
local slots = {}
for i = 6 + 2 * n, #ARGV, 2 do
  local record = ARGV[i + 1]
  if redis.call('SET', P .. 't:' .. ARGV[i], record, 'EX', ARGV[4], 'NX') then
    tasks = tasks + 1
  end
  local _, llm, sid = string.match(record, '^(%S+) ?(%S*) ?(%S*)$')
  if sid and sid ~= '' then
    local key = P .. 'f:' .. llm .. ':' .. sid
    slots[key] = (slots[key] or 0) + 1
  end
end
for key, count in pairs(slots) do redis.call('HSET', key, me, count) end
return {streams, tasks}
