-- REAP: return the jobs of expired leases (a dead or stuck worker) to the queue.
--   KEYS[1] ready  KEYS[2] inflight  KEYS[3] wake  KEYS[4] queued  KEYS[5] sched  KEYS[6] drain
--   ARGV[1] job key prefix  ARGV[2] max attempts  ARGV[3] max jobs per call
--   ARGV[4] how long a drain figure stays fresh, ms
-- A reaped job goes back to its original place (the head of its tier, as it was
-- among the oldest), keeping its deadline, trace and payload. A job that has been
-- claimed ``max attempts`` times is not redelivered: it is removed and returned so
-- its caller can be answered (a poison input must not kill worker after worker).
-- Safe to run from any number of processes: each call is atomic and idempotent.
-- A model found idle (nothing queued, nothing leased) has its scheduler state and
-- tenant counts dropped, and its drain figures once none is fresh: virtual time
-- restarts at 0, a burst right after a pause is still shed by the figures of a
-- moment ago, and an idle model leaves no keys (REPLY_ACK leaves this to the sweep,
-- off the request path).
-- Returns {requeued count, {dead id, reply_to, attempts, ...}}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids = redis.call('ZRANGE', KEYS[2], '-inf', now, 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[3]))
local requeued, dead = 0, {}
for _, id in ipairs(ids) do
  local jk = ARGV[1] .. id
  redis.call('ZREM', KEYS[2], id)
  local meta = redis.call('HMGET', jk, 'a', 'q', 'r', 't')
  if meta[2] then
    if tonumber(meta[1]) >= tonumber(ARGV[2]) then
      redis.call('DEL', jk, jk .. ':p')
      dead[#dead + 1] = id
      dead[#dead + 1] = meta[3]
      dead[#dead + 1] = meta[1]
    else
      redis.call('HDEL', jk, 'k', 'w')
      redis.call('ZADD', KEYS[1], meta[2], id)
      redis.call('HINCRBY', KEYS[4], meta[4], 1)
      requeued = requeued + 1
    end
  end
end
if requeued > 0 and redis.call('LLEN', KEYS[3]) == 0 then redis.call('RPUSH', KEYS[3], 1) end
if redis.call('EXISTS', KEYS[1], KEYS[2]) == 0 then
  redis.call('DEL', KEYS[4], KEYS[5])
  local drain = redis.call('HGETALL', KEYS[6])
  local fresh = false
  for i = 2, #drain, 2 do
    local seen = tonumber(string.match(drain[i], ' (%S+)$'))
    if seen and now - seen <= tonumber(ARGV[4]) then fresh = true; break end
  end
  if not fresh then redis.call('DEL', KEYS[6]) end
end
return {requeued, dead}
