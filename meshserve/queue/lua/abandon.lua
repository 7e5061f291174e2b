-- ABANDON: the caller of a leased job went away (a decoupled request's stream was
-- cancelled): mark the job, so that its worker's next partial reply is refused
-- (REPLY_PARTIAL answers -1) and the worker ends it instead of generating on for
-- nobody. A job no worker holds is WITHDRAW's; a finished one is gone.
--   KEYS[1] the job's hash
-- Returns 1 marked, 0 not leased (or gone).
if redis.call('HEXISTS', KEYS[1], 'k') == 1 then
  redis.call('HSET', KEYS[1], 'x', 1)
  return 1
end
return 0
