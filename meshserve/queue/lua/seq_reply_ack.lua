-- SEQ_REPLY_ACK: REPLY_ACK (reply_ack.lua) for a stateful model's steps: each step's
-- reply, its ack and its sequence's new state go in together, atomically, so a state
-- is never written without its reply and ack, nor a step acked without its state.
--   KEYS[1] the gateway's reply list  KEYS[2] inflight  KEYS[3] ready  KEYS[4] wake
--   KEYS[5] the model's live set
--   ARGV[1] job key prefix  ARGV[2] the reply list's time to live, s
--   ARGV[3] sequence state key prefix  ARGV[4] tenant live set key prefix
--   ARGV[5] idle timeout, ms  ARGV[6] n, the number of replies  ARGV[7 .. 6+n] serialized replies
--   ARGV[7+n ..] quadruples: fencing token, job id, op, state bytes
--     op 'w': write the state (or, for a step that ends its sequence, free it);
--     op 'k': keep the state as it was (the step failed); '-' a job of no sequence.
-- The push goes first, as in REPLY_ACK: a refused write writes, acks and changes
-- nothing. Only a job whose lease is still this token's is acked and writes state: a
-- worker whose lease was reaped (it stalled, the step was redelivered) changes
-- nothing, so a step is applied once. Its sequence's turn ends with the ack (field
-- 'b' cleared), and the wake token is given back when work remains, since a claim
-- leaves no token while the only jobs left wait on a sequence's turn.
-- Returns how many jobs were acked.
local n = tonumber(ARGV[6])
if redis.call('RPUSH', KEYS[1], unpack(ARGV, 7, 6 + n)) == n then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local idle = tonumber(ARGV[5])
local acked, dead = {}, {}
for i = 7 + n, #ARGV, 4 do
  local jk = ARGV[1] .. ARGV[i + 1]
  local meta = redis.call('HMGET', jk, 'k', 'z', 'y', 't')
  if meta[1] == ARGV[i] then
    acked[#acked + 1] = ARGV[i + 1]
    dead[#dead + 1] = jk
    dead[#dead + 1] = jk .. ':p'  -- its payload key, if the gateway wrote one
    local member, op = meta[2], ARGV[i + 2]
    if member and op ~= '-' then
      local sk = ARGV[3] .. member
      local tenant_live = ARGV[4] .. (meta[4] or '')
      if op == 'w' and string.find(meta[3] or '', 'e', 1, true) then  -- the sequence's last step
        redis.call('DEL', sk)
        redis.call('ZREM', KEYS[5], member)
        redis.call('ZREM', tenant_live, member)
      elseif op == 'w' then
        redis.call('HSET', sk, 'v', ARGV[i + 3])
        redis.call('HDEL', sk, 'b')
        redis.call('PEXPIRE', sk, idle)
        redis.call('ZADD', KEYS[5], now + idle, member)
        redis.call('ZADD', tenant_live, now + idle, member)
      elseif redis.call('HGET', sk, 'b') == ARGV[i + 1] then
        redis.call('HDEL', sk, 'b')
      end
    end
  end
end
if #acked > 0 then
  redis.call('ZREM', KEYS[2], unpack(acked))
  redis.call('DEL', unpack(dead))
  if redis.call('LLEN', KEYS[4]) == 0 and redis.call('EXISTS', KEYS[3]) == 1 then redis.call('RPUSH', KEYS[4], 1) end
end
return #acked
