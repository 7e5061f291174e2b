-- EXTEND: renew a lease while its batch computes (heartbeat).
--   KEYS[1] inflight
--   ARGV[1] job key prefix  ARGV[2] fencing token  ARGV[3] lease, ms  ARGV[4..] job ids
-- Only jobs still held under the token are extended. Returns how many.
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[3])
local n = 0
for i = 4, #ARGV do
  if redis.call('HGET', ARGV[1] .. ARGV[i], 'k') == ARGV[2] then
    redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i])
    n = n + 1
  end
end
return n
