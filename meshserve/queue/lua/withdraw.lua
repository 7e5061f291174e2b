-- WITHDRAW: the caller gave up (cancelled, or its deadline passed in the gateway):
-- remove its job if no worker holds it yet, so it is never computed for nobody.
--   KEYS[1] ready  KEYS[2] job hash  KEYS[3] queued
--   ARGV[1] job id
-- Returns 1 withdrawn, 0 already leased, finished or gone.
if redis.call('HEXISTS', KEYS[2], 'k') == 1 then return 0 end
local tenant = redis.call('HGET', KEYS[2], 't')
redis.call('DEL', KEYS[2], KEYS[2] .. ':p')
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
if removed == 1 and tenant and redis.call('HINCRBY', KEYS[3], tenant, -1) <= 0 then
  redis.call('HDEL', KEYS[3], tenant)
end
return removed
