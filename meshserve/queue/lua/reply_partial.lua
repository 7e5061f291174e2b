-- REPLY_PARTIAL: push a decoupled model's partial responses (more follow) to one
-- gateway's reply list, without ack: their jobs stay leased until the last reply,
-- which REPLY_ACK writes and acks as for any job.
--   KEYS[1] the gateway's reply list
--   ARGV[1] job key prefix  ARGV[2] the reply list's time to live, s
--   ARGV[3 ..] triples: fencing token, job id, serialized reply
-- A partial whose job is no longer held under its token (the lease moved on, or the
-- job is gone) is not pushed: a stalled worker never streams into a request another
-- worker now holds. Each pushed partial counts on its job hash ('o': responses sent),
-- which a worker that claims the job again reads, to end it rather than restart it
-- (the client would see its responses twice).
-- A job whose caller went away (ABANDON marked it 'x') is not pushed either.
-- Returns one integer per partial: 1 pushed, 0 dropped (lease moved on), -1 dropped
-- (the caller went away: the worker ends the job).
local out = {}
local pushed = false
for i = 3, #ARGV, 3 do
  local jk = ARGV[1] .. ARGV[i + 1]
  local held = redis.call('HMGET', jk, 'k', 'x')
  if held[1] == ARGV[i] and held[2] then
    out[#out + 1] = -1
  elseif held[1] == ARGV[i] then
    redis.call('RPUSH', KEYS[1], ARGV[i + 2])
    redis.call('HINCRBY', jk, 'o', 1)
    pushed = true
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
if pushed then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return out
