-- REWAKE: give back a wake token a worker took for a model it no longer serves,
-- so that a worker that does serve it takes the work.
--   KEYS[1] wake  KEYS[2] ready
--   no ARGV
-- Pushed only while jobs are queued and the list is empty (it holds at most one
-- token). Returns 1 pushed, 0 not needed.
if redis.call('ZCARD', KEYS[2]) > 0 and redis.call('LLEN', KEYS[1]) == 0 then
  redis.call('RPUSH', KEYS[1], 1)
  return 1
end
return 0
