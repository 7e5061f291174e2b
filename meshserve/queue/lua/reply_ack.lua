-- REPLY_ACK: write replies to one gateway's list and ack their jobs, atomically: a
-- job is never acked without its reply, nor its reply written without the ack.
--   KEYS[1] the gateway's reply list  KEYS[2] inflight
--   ARGV[1] job key prefix  ARGV[2] the reply list's time to live, s
--   ARGV[3] n, the number of replies  ARGV[4 .. 3+n] serialized replies
--   ARGV[4+n ..] pairs: fencing token, job id (jobs to ack once their replies are in)
-- The RPUSH goes first: a Redis that refuses writes (OOM at maxmemory, READONLY
-- after a failover) fails the script there, before anything is written, so a refusal
-- leaves every lease as it was. A job whose lease moved on (another token) is not
-- acked; its reply is written all the same (the gateway drops a late duplicate).
-- The ack is ACK's (ack.lua) but for the idle reset, which REAP's sweep does instead:
-- at low load a model goes idle after every call, and resetting it each time would
-- cost every call two more commands (and the next claim one more).
-- Returns how many jobs were acked.
local n = tonumber(ARGV[3])
-- A list longer than this push was there already, with the expiry its first push set.
-- n is 0 when every reply went beside the script (protocol.reply_ack_commands).
if n > 0 and redis.call('RPUSH', KEYS[1], unpack(ARGV, 4, 3 + n)) == n then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
local acked, dead = {}, {}
for i = 4 + n, #ARGV, 2 do
  local jk = ARGV[1] .. ARGV[i + 1]
  if redis.call('HGET', jk, 'k') == ARGV[i] then
    acked[#acked + 1] = ARGV[i + 1]
    dead[#dead + 1] = jk
    dead[#dead + 1] = jk .. ':p'  -- its payload key, if the gateway wrote one
  end
end
if #acked > 0 then
  redis.call('ZREM', KEYS[2], unpack(acked))
  redis.call('DEL', unpack(dead))
end
return #acked
