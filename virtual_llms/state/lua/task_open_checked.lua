-- llm_check.lua and task_open.lua in one round trip, for a row cached by the caller: the
-- task (record KEYS[3] = ARGV[6], for ARGV[7] seconds) is opened, and unless ARGV[8] is ''
-- its frame ARGV[8] published to the holder, only while the row's stamps and the session's
-- live holder are those the cached copy was read under (ARGV[4], ARGV[5]). Either way the
-- stamps and the holder come back, with 1 if the task was opened.
local st = redis.call('HMGET', KEYS[1], ARGV[1], ARGV[2], '*')
local stamp = (st[1] or '') .. '/' .. (st[2] or '') .. '/' .. (st[3] or '')
local p = redis.call('GET', KEYS[2])
local ch = p and string.match(p, '^(%S+)')
if p and redis.call('EXISTS', ARGV[3] .. ch) == 0 then p = false end
if stamp ~= ARGV[4] or p ~= ARGV[5] then return {stamp, p, 0} end
redis.call('SET', KEYS[3], ARGV[6], 'EX', ARGV[7])
if ARGV[8] ~= '' then redis.call('PUBLISH', ch, ARGV[8]) end
return {stamp, p, 1}
