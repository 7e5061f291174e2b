-- ENQUEUE: one atomic call per accepted request.
--   KEYS[1] ready  KEYS[2] job hash  KEYS[3] wake  KEYS[4] sched  KEYS[5] queued  KEYS[6] drain
--   KEYS[7] the job's payload key (with ARGV[14] '2')
--   ARGV[1] job id  ARGV[2] tier (0 = highest)  ARGV[3] payload (bytes)
--   ARGV[4] deadline, epoch ms  ARGV[5] tenant  ARGV[6] reply_to  ARGV[7] shape signature
--   ARGV[8] max_queue_size of the model, jobs (0 = unbounded)  ARGV[9] job TTL grace, ms
--   ARGV[10] batch items in the request (dim 0; 1 for a model that does not batch)
--   ARGV[11] the tenant's weight in its tier (> 0)
--   ARGV[12] the tenant's max queued requests for this model (0 = unbounded)
--   ARGV[13] how long a drain figure stays fresh, ms
--   ARGV[14] '1': the payload is large and already in the job hash's field 'b' (with
--            ARGV[3] empty), written outside Lua so that Redis holds no Lua copies
--            of it; a refusal deletes that field's hash unless the job was queued. With
--            no field 'b' (its write, pipelined ahead, was refused) nothing is queued:
--            code -4.
--            '2': the payload is already in its own key KEYS[7] (a plain SET with the
--            job's expiry, pipelined ahead; ARGV[3] empty), read by the worker with MGET;
--            a refusal deletes that key unless the job was queued; no key (its SET was
--            refused): code -4.
--   ARGV[15] a stateful model's step: its sequence's member (absent or '' = none)
--   ARGV[16] the step's flags: 's' starts its sequence, 'e' ends it
--   TIER_SPAN (score distance between tiers) comes from the loader's prelude.
-- Returns {code, estimated wait ms}: code 1 enqueued, 0 duplicate id (idempotent
-- retry), -1 model queue full, -2 the tenant's queue full, -3 it would wait past its
-- deadline (the wait is the estimate), -4 ARGV[14]'s field is missing. An accepted job's wait is 0 unless its deadline
-- was near enough to count the jobs ahead of it (the whole queue would not fit). A refusal writes nothing (and removes ARGV[14]'s bulk).
local function refuse(code, wait)
  if ARGV[14] == '1' and redis.call('HEXISTS', KEYS[2], 'd') == 0 then redis.call('DEL', KEYS[2]) end
  if ARGV[14] == '2' and redis.call('HEXISTS', KEYS[2], 'd') == 0 then redis.call('DEL', KEYS[7]) end
  return {code, wait}
end
if ARGV[14] == '1' and redis.call('HEXISTS', KEYS[2], 'b') == 0 then return {-4, 0} end
if ARGV[14] == '2' and redis.call('EXISTS', KEYS[7]) == 0 then return {-4, 0} end
local queued = redis.call('ZCARD', KEYS[1])  -- also bounds what can be ahead: 0 skips the count below
local max_queue = tonumber(ARGV[8])
if max_queue > 0 and queued >= max_queue then return refuse(-1, 0) end
local tenant = ARGV[5]
local max_mine = tonumber(ARGV[12])
if max_mine > 0 and (tonumber(redis.call('HGET', KEYS[5], tenant)) or 0) >= max_mine then return refuse(-2, 0) end
if redis.call('HEXISTS', KEYS[2], 'd') == 1 then return {0, 0} end  -- 'd': set below, by an enqueue only
local tier = tonumber(ARGV[2])
local finish = 'f' .. tier .. ':' .. tenant
local clock = redis.call('HMGET', KEYS[4], 'c' .. tier, finish)
local start = math.max(tonumber(clock[1]) or 0, tonumber(clock[2]) or 0)
local score = string.format('%.17g', tier * TIER_SPAN + start)
local wait = 0
if queued > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local rate, fresh = 0, tonumber(ARGV[13])
  local drain = redis.call('HGETALL', KEYS[6])
  for i = 2, #drain, 2 do
    local per_job, seen = string.match(drain[i], '^(%S+) (%S+)$')
    if per_job and now - tonumber(seen) <= fresh and tonumber(per_job) > 0 then rate = rate + 1 / tonumber(per_job) end
  end
  -- The whole queue ahead still fits before the deadline: no need to count what is ahead.
  if rate > 0 and now + math.floor((queued + 1) / rate) > tonumber(ARGV[4]) then
    local ahead = redis.call('ZCOUNT', KEYS[1], '-inf', '(' .. score)
    if ahead > 0 then
      wait = math.floor((ahead + 1) / rate)
      if now + wait > tonumber(ARGV[4]) then return refuse(-3, wait) end
    end
  end
end
redis.call('HSET', KEYS[4], finish, string.format('%.17g', start + tonumber(ARGV[10]) / tonumber(ARGV[11])))
redis.call('HSET', KEYS[2], 'p', ARGV[3], 'd', ARGV[4], 't', tenant, 'r', ARGV[6], 's', ARGV[7], 'a', 0,
           'q', score, 'n', ARGV[10])
if ARGV[15] and ARGV[15] ~= '' then redis.call('HSET', KEYS[2], 'z', ARGV[15], 'y', ARGV[16]) end
redis.call('PEXPIREAT', KEYS[2], tonumber(ARGV[4]) + tonumber(ARGV[9]))
redis.call('ZADD', KEYS[1], score, ARGV[1])
redis.call('HINCRBY', KEYS[5], tenant, 1)
-- At most one wake token. An empty ready set had none left by a claim (a claim leaves
-- one only while work remains), so push without looking; if one was there anyway
-- (work taken by a later claim), take the extra back.
if queued == 0 then
  if redis.call('RPUSH', KEYS[3], 1) > 1 then redis.call('LPOP', KEYS[3]) end
elseif redis.call('LLEN', KEYS[3]) == 0 then
  redis.call('RPUSH', KEYS[3], 1)
end
return {1, wait}
