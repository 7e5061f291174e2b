-- RELEASE: give back jobs a worker took but will not run (it is stopping).
--   KEYS[1] ready  KEYS[2] inflight  KEYS[3] wake  KEYS[4] queued
--   ARGV[1] job key prefix  ARGV[2] fencing token  ARGV[3..] job ids
-- Each goes back to its original place in the ready set; the attempt is not
-- counted (the model never saw it). Returns how many.
local n = 0
for i = 3, #ARGV do
  local jk = ARGV[1] .. ARGV[i]
  if redis.call('HGET', jk, 'k') == ARGV[2] then
    redis.call('ZREM', KEYS[2], ARGV[i])
    redis.call('HDEL', jk, 'k', 'w')
    redis.call('HINCRBY', jk, 'a', -1)
    redis.call('ZADD', KEYS[1], redis.call('HGET', jk, 'q'), ARGV[i])
    redis.call('HINCRBY', KEYS[4], redis.call('HGET', jk, 't'), 1)
    n = n + 1
  end
end
if n > 0 and redis.call('LLEN', KEYS[3]) == 0 then redis.call('RPUSH', KEYS[3], 1) end
return n
