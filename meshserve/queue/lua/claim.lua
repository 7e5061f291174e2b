-- CLAIM: take a batch, atomically.
--   KEYS[1] ready  KEYS[2] inflight  KEYS[3] wake  KEYS[4] fence  KEYS[5] sched  KEYS[6] queued
--   KEYS[7] drain
--   ARGV[1] job key prefix  ARGV[2] max batch items  ARGV[3] lease, ms  ARGV[4] worker id
--   ARGV[5] scan limit, jobs (how far past the head to look for same-shaped jobs)
--   ARGV[6] required shape signature ('' = the head's)
--   ARGV[7] lower-tier share: every Nth claim serves a lower tier with work (0 = off)
--   ARGV[8] ms the batch will take (jobs due sooner cannot finish: they count as expired)
--   ARGV[9] the worker's recent ms per job on this model (0 = none yet), for shedding
--   ARGV[10] sequence state key prefix ('' = a model without sequences)
--   ARGV[11] the model's sequence idle timeout, ms
--   TIER_SPAN and NUM_TIERS come from the loader's prelude.
-- Walks the ready set in score order (highest tier, then lowest virtual start).
-- Jobs past their deadline, or due before the batch could finish, are removed and
-- returned as expired (never computed: under overload the worker spends itself on
-- requests that can still make it, not on answers nobody waits for). But when no job
-- would be taken, the first one still before its deadline is taken anyway: the
-- estimate may be stale (one slow batch), and only a batch that runs can correct it.
-- Jobs whose shape signature differs from the batch's stay queued, and so do jobs
-- whose items would overflow the batch (the sum of dim 0 never exceeds max items).
-- Taken jobs move to inflight with a lease, get a fencing token, and count an
-- attempt; each tier's virtual clock advances to the latest start it served.
-- Commands are batched: one HMGET of the scheduler state, one of each scanned job,
-- one ZREM of everything leaving the ready set, one ZADD into inflight, one HSET per
-- taken job (its payload came with its HMGET), one HSET of the scheduler state; when
-- the scan emptied the ready set, one DEL of the tenants' counts instead of a count
-- per tenant.
-- Sequences (a stateful model): a step whose sequence has a step taken or in flight
-- (its hash's 'b' names another job that still exists) stays queued, and so does a
-- second step of one sequence in one scan: steps of a sequence run one at a time,
-- in queue order; steps of different sequences batch together. A redelivered step
-- ('b' is its own id) is taken again. A taken step marks its sequence's turn and
-- comes with its state: '' for the initial state (it starts the sequence), false
-- when the sequence is not live (never started, ended, or idle past the timeout).
-- Returns {token, now_ms, {id, payload, ...}, {expired id, reply_to, ...},
-- {step id, member, flags, state, ...}}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prefix, room, scan = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[5])
local due = now + (tonumber(ARGV[8]) or 0)
local sig = ARGV[6]
if sig == '' then sig = nil end
local function call_many(command, key, args)  -- one variadic call per 4 000 arguments (Lua's stack)
  for i = 1, #args, 4000 do
    redis.call(command, key, unpack(args, i, math.min(i + 3999, #args)))
  end
end
local seq_prefix = ARGV[10] or ''
local ids = redis.call('ZRANGE', KEYS[1], 0, scan - 1)
if #ids == 0 then return {0, now, {}, {}, {}} end  -- nothing queued: touch nothing
if tonumber(ARGV[9]) > 0 then redis.call('HSET', KEYS[7], ARGV[4], ARGV[9] .. ' ' .. now) end
-- the scheduler's state in one read: the claims' turn, then each tier's virtual clock
local fields = {'turn'}
for tier = 0, NUM_TIERS - 1 do fields[#fields + 1] = 'c' .. tier end
local state = redis.call('HMGET', KEYS[5], unpack(fields))
local every = tonumber(ARGV[7])
local turn = nil
local lowered = false  -- ids come from one lower tier, not the head of the whole set
if every > 0 then
  turn = (tonumber(state[1]) or 0) + 1
  if turn % every == 0 then
    local top = math.floor(tonumber(redis.call('ZSCORE', KEYS[1], ids[1])) / TIER_SPAN)
    local lower = NUM_TIERS - 1 - top
    for k = 0, lower - 1 do
      local tier = top + 1 + ((math.floor(turn / every) + k) % lower)
      local found = redis.call('ZRANGE', KEYS[1], string.format('%.17g', tier * TIER_SPAN),
                               '(' .. string.format('%.17g', (tier + 1) * TIER_SPAN), 'BYSCORE', 'LIMIT', 0, scan)
      if #found > 0 then ids, lowered = found, true; break end
    end
  end
end
local taken, metas, expired, clocks = {}, {}, {}, {}
local leaving, dead = {}, {}  -- ids off the ready set; job hashes to delete
local unqueued = {}  -- tenant -> jobs of theirs off the ready set
local probe, probe_meta = nil, nil  -- due before the batch could finish, not yet past its deadline
local function unqueue(tenant)
  if tenant then unqueued[tenant] = (unqueued[tenant] or 0) + 1 end
end
local function expire(id, meta)
  leaving[#leaving + 1] = id
  dead[#dead + 1] = prefix .. id
  unqueue(meta[5])
  expired[#expired + 1] = id
  expired[#expired + 1] = meta[3]
end
local turns, waiting = {}, 0  -- sequences taken by this claim; steps left waiting for their turn
local function blocked(id, meta)
  local member = meta[8]
  if not member or seq_prefix == '' then return false end
  if turns[member] then return true end
  local holder = redis.call('HGET', seq_prefix .. member, 'b')
  return holder ~= false and holder ~= id and redis.call('EXISTS', prefix .. holder) == 1
end
local function take(id, meta)
  taken[#taken + 1] = id
  metas[#metas + 1] = meta
  leaving[#leaving + 1] = id
  unqueue(meta[5])
  local score = tonumber(meta[6]) or 0
  local tier = math.floor(score / TIER_SPAN)
  clocks[tier] = math.max(clocks[tier] or 0, score - tier * TIER_SPAN)
  room = room - (tonumber(meta[4]) or 1)
  if meta[8] and seq_prefix ~= '' then turns[meta[8]] = true end
end
-- The first max-items jobs are read with their payload (field 10): most batches take
-- them, and a payload read with the rest costs no command of its own.
local first = tonumber(ARGV[2])
for i, id in ipairs(ids) do
  local meta
  if i <= first then
    meta = redis.call('HMGET', prefix .. id, 'd', 's', 'r', 'n', 't', 'q', 'a', 'z', 'y', 'p')
  else
    meta = redis.call('HMGET', prefix .. id, 'd', 's', 'r', 'n', 't', 'q', 'a', 'z', 'y')
  end
  if not meta[1] then
    leaving[#leaving + 1] = id  -- its hash expired: nothing to run
  elseif tonumber(meta[1]) > now and blocked(id, meta) then
    waiting = waiting + 1  -- its sequence's step before it has not been answered
  elseif tonumber(meta[1]) <= due then
    if probe == nil and tonumber(meta[1]) > now and (sig == nil or meta[2] == sig)
        and (tonumber(meta[4]) or 1) <= room then
      probe, probe_meta = id, meta
    else
      expire(id, meta)
    end
  else
    if sig == nil then sig = meta[2] end
    if meta[2] == sig and (tonumber(meta[4]) or 1) <= room then
      take(id, meta)
      if room <= 0 then break end
    end
  end
  -- A step left queued (another shape, no room) holds back the later steps of its sequence.
  if meta[1] and meta[8] and seq_prefix ~= '' then turns[meta[8]] = true end
end
if probe ~= nil then
  if #taken == 0 then take(probe, probe_meta) else expire(probe, probe_meta) end
end
call_many('ZREM', KEYS[1], leaving)
for _, jk in ipairs(dead) do redis.call('DEL', jk, jk .. ':p') end  -- rare (expired jobs): one by one, with the payload key
local out, steps = {}, {}
local token = 0
if #taken > 0 then
  token = redis.call('INCR', KEYS[4])
  local expiry = now + tonumber(ARGV[3])
  local leased = {}
  for i, id in ipairs(taken) do
    leased[2 * i - 1], leased[2 * i] = expiry, id
  end
  call_many('ZADD', KEYS[2], leased)
  for i, id in ipairs(taken) do
    local jk = prefix .. id
    redis.call('HSET', jk, 'k', token, 'w', ARGV[4], 'a', (tonumber(metas[i][7]) or 0) + 1)
    out[#out + 1] = id
    out[#out + 1] = metas[i][10] or redis.call('HGET', jk, 'p')
    local member = metas[i][8]
    if member and seq_prefix ~= '' then
      local sk, flags = seq_prefix .. member, metas[i][9] or ''
      local state = redis.call('HGET', sk, 'v')
      if string.find(flags, 's', 1, true) then state = '' end  -- a start: the initial state
      if state then
        redis.call('HSET', sk, 'b', id)
        redis.call('PEXPIRE', sk, tonumber(ARGV[11]))
      end
      local at = #steps
      steps[at + 1], steps[at + 2], steps[at + 3], steps[at + 4] = id, member, flags, state
    end
  end
end
-- Every scanned job left and the scan saw the whole set (or the tier it looked at
-- was not the head's): the ready set is empty without asking Redis.
local empty
if not lowered and #ids < scan and #leaving == #ids then
  empty = true
else
  empty = redis.call('EXISTS', KEYS[1]) == 0
end
if empty then
  redis.call('DEL', KEYS[6])  -- nothing queued: every count is 0 (heals a count lost to an evicted job)
  if #taken == 0 and redis.call('EXISTS', KEYS[2]) == 0 then  -- idle: reset virtual time
    redis.call('DEL', KEYS[5], KEYS[7])
    return {token, now, out, expired, steps}
  end
else
  for tenant, n in pairs(unqueued) do
    if redis.call('HINCRBY', KEYS[6], tenant, -n) <= 0 then redis.call('HDEL', KEYS[6], tenant) end
  end
  -- Steps waiting for their sequence's turn get their token from that turn's ack
  -- (SEQ_REPLY_ACK), not from here: a token for them alone would wake worker after
  -- worker to claim nothing.
  if redis.call('LLEN', KEYS[3]) == 0 and (waiting == 0 or redis.call('ZCARD', KEYS[1]) > waiting) then
    redis.call('RPUSH', KEYS[3], 1)
  end
end
local write = {}
if turn ~= nil then write[1], write[2] = 'turn', turn end
for tier, clock in pairs(clocks) do
  if clock > (tonumber(state[tier + 2]) or 0) then
    write[#write + 1] = 'c' .. tier
    write[#write + 1] = string.format('%.17g', clock)
  end
end
if #write > 0 then redis.call('HSET', KEYS[5], unpack(write)) end
return {token, now, out, expired, steps}
