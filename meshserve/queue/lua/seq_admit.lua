-- SEQ_ADMIT: admit one step of a sequence (a stateful model) before it is enqueued.
--   KEYS[1] the sequence's state hash  KEYS[2] the model's live set  KEYS[3] the tenant's live set
--   ARGV[1] the sequence's member  ARGV[2] '1': the step starts the sequence
--   ARGV[3] idle timeout, ms  ARGV[4] max live sequences (0 = unbounded)
--   ARGV[5] max live sequences of the tenant (0 = unbounded)
--   ARGV[6] the step's queue tier (as the request asked it)
-- A step that does not start a sequence needs the sequence live (its hash exists: it
-- was started and has not ended nor been idle past the timeout). A start of a sequence
-- that is not live counts against the caps and creates it with the initial state ('').
-- Every admitted step renews the idle timeout. The live sets are trimmed of expired
-- sequences first (Redis expired their hashes on its own).
-- A sequence's steps all queue at the tier its start step had (field 'r'): a later
-- step sent at a higher priority would otherwise be claimed before an earlier one.
-- Returns {1, the tier to queue the step at} admitted, {-1} not live, {-2} the model's
-- cap, {-3} the tenant's cap.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local idle = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if redis.call('EXISTS', KEYS[1]) == 0 then
  if ARGV[2] ~= '1' then return {-1} end
  local cap, mine = tonumber(ARGV[4]), tonumber(ARGV[5])
  if cap > 0 and redis.call('ZSCORE', KEYS[2], ARGV[1]) == false and redis.call('ZCARD', KEYS[2]) >= cap then return {-2} end
  if mine > 0 and redis.call('ZSCORE', KEYS[3], ARGV[1]) == false and redis.call('ZCARD', KEYS[3]) >= mine then return {-3} end
  redis.call('HSET', KEYS[1], 'v', '')
end
redis.call('PEXPIRE', KEYS[1], idle)
redis.call('ZADD', KEYS[2], now + idle, ARGV[1])
redis.call('ZADD', KEYS[3], now + idle, ARGV[1])
local tier = ARGV[6]
if ARGV[2] == '1' then
  redis.call('HSET', KEYS[1], 'r', tier)
else
  tier = redis.call('HGET', KEYS[1], 'r') or tier  -- a sequence started before 'r' existed: as asked
end
return {1, tonumber(tier)}
