-- ACK: finish jobs of a lease, only with its current fencing token.
--   KEYS[1] inflight  KEYS[2] ready  KEYS[3] sched  KEYS[4] drain
--   ARGV[1] job key prefix  ARGV[2] fencing token  ARGV[3..] job ids
-- When the model goes idle (nothing queued, nothing leased) its scheduler state
-- and drain figures are dropped: virtual time restarts at 0, the next claim says
-- how fast its worker goes, and an idle model leaves no keys.
-- Returns how many jobs were acked (a stale token acks none).
local acked, dead = {}, {}
for i = 3, #ARGV do
  local jk = ARGV[1] .. ARGV[i]
  if redis.call('HGET', jk, 'k') == ARGV[2] then
    acked[#acked + 1] = ARGV[i]
    dead[#dead + 1] = jk
    dead[#dead + 1] = jk .. ':p'  -- its payload key, if the gateway wrote one
  end
end
if #acked > 0 then
  redis.call('ZREM', KEYS[1], unpack(acked))
  redis.call('DEL', unpack(dead))
end
if redis.call('EXISTS', KEYS[1], KEYS[2]) == 0 then redis.call('DEL', KEYS[3], KEYS[4]) end  -- both sets empty
return #acked
