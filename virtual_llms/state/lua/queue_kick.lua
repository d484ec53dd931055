-- uses: lib/fleet.lua
-- A stream (re)bound for a session: the queue's head of each of its LLMs (ARGV[2..]) hears
-- that a slot may be free, rather than at its next re-check. Prefix ARGV[1].
for i = 2, #ARGV do notify_head(ARGV[1], ARGV[i]) end
return 1
