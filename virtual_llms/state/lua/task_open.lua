-- A new task's record KEYS[1] (ARGV[1], for ARGV[2] seconds), and its frame (ARGV[4], the
-- channel layer's bytes) published to the hub holding the stream (ARGV[3]).
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
