-- Delete presence KEYS[1] only while it names this stream (ARGV[1]): an old stream's
-- closing never unbinds a newer one.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
