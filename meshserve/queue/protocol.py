"""The queue protocol: Redis key layout and Lua scripts, shared by gateway and workers.

Everything that touches the queue's keys lives here, so the protocol can be read
(and changed) in one place.

Keys of one model version share the Cluster hash tag ``{m:<model>:<version>}``
(written ``{m:<model>}`` below):

    ms:{m:<model>}:ready      ZSET  job id -> tier * 2^40 + virtual start (lowest first)
    ms:{m:<model>}:inflight   ZSET  job id -> lease expiry, Redis clock ms
    ms:{m:<model>}:job:<id>   HASH  p=payload d=deadline_ms t=tenant r=reply_to
                                    s=shape signature n=batch items q=ready score a=attempts
                                    k=fencing token of the current lease w=worker
    ms:{m:<model>}:wake       LIST  at most one token: "there may be work" (workers block on it)
    ms:{m:<model>}:sched      HASH  c<tier> = virtual clock of a tier; f<tier>:<tenant> =
                                    the tenant's virtual finish in that tier; turn = claims
    ms:{m:<model>}:queued     HASH  tenant -> its jobs in the ready set (for max_queued)
    ms:{m:<model>}:fence      STR   fencing-token counter for leases
    ms:{m:<model>}:drain      HASH  worker id -> "<ms per job> <when, Redis clock ms>": how
                                    fast each worker has been taking this model's jobs

Scheduling. Tiers are strict, except that every Nth claim (``lower_share``) serves a
lower tier that has work, in rotation, so no tier starves. Inside a tier, tenants
share by weight with start-time fair queuing: a job's virtual start is
``max(clock[tier], finish[tenant])`` and moves the tenant's finish on by
``items / weight``; claims take the lowest start and advance the tier's clock to
it. A tenant that floods only pushes its own jobs back. Scores are written with
17 significant digits (Lua's default keeps 14), so starts keep about 1/2000 of an
item of resolution up to 2^40 items of history.

Shedding. A request the queue cannot serve before its deadline is refused at
enqueue (RESOURCE_EXHAUSTED, answered at once) instead of waiting until its deadline
for nothing: the jobs ahead of it (lower scores: its tier's earlier starts and every
higher tier) divided by the model's drain rate (the sum of its workers' recent
jobs per ms) estimate its wait. A flooding tenant's own jobs start late in virtual
time, so its excess is refused while a neighbour's requests are still admitted.
With no fresh drain figure, or nothing ahead, nothing is refused. Claims drop what
the estimate let through but that still cannot finish.

Replies go to the owning gateway's list ``ms:{g:<gateway>}:replies``. Each worker
also blocks on its own list ``ms:{w:<worker>}:wake``: a token there means "the set
of models you serve changed", so its blocking wait starts again on the new set.

Job hashes are addressed inside the scripts from a prefix passed in ARGV. That is
safe on Redis Cluster because the prefix carries the model's hash tag, so every key
a script touches lives in one slot.

Time inside scripts comes from Redis ``TIME``; deadlines are absolute epoch
milliseconds set by the gateway (hosts are assumed NTP-synchronised).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Required, TypedDict, Unpack

from meshserve.store.link import RedisLink, Script

TIER_SPAN = 2**40
"""Score distance between priority tiers: tiers stay strict, fair queuing inside one."""

NUM_TIERS = 3
"""Tier 0 is served first. Clients' ``priority`` parameter maps onto these."""

JOB_TTL_GRACE_MS = 60_000
"""A job hash outlives its deadline by this much, so a lost one is reclaimed."""

DRAIN_FRESH_MS = 5_000
"""A worker's drain figure counts for shedding this long after its last claim."""

REPLY_TTL_S = 120
"""A gateway's reply list expires this long after the last write (dead gateway)."""


@dataclass(frozen=True, slots=True)
class ModelKeys:
    """All keys of one model, with its hash tag."""

    ready: str
    inflight: str
    wake: str
    sched: str
    queued: str
    fence: str
    drain: str
    job_prefix: str

    @classmethod
    def for_model(cls, model: str, version: int) -> ModelKeys:
        base = f"ms:{{m:{model}:{version}}}:"
        return cls(
            ready=base + "ready",
            inflight=base + "inflight",
            wake=base + "wake",
            sched=base + "sched",
            queued=base + "queued",
            fence=base + "fence",
            drain=base + "drain",
            job_prefix=base + "job:",
        )

    def job(self, job_id: str) -> str:
        return self.job_prefix + job_id


def reply_key(gateway_id: str) -> str:
    return f"ms:{{g:{gateway_id}}}:replies"


def worker_wake_key(worker_id: str) -> str:
    """The worker's own wake list; it deletes it on close."""
    return f"ms:{{w:{worker_id}}}:wake"


# ENQUEUE: one atomic call per accepted request.
#   KEYS[1] ready  KEYS[2] job hash  KEYS[3] wake  KEYS[4] sched  KEYS[5] queued  KEYS[6] drain
#   ARGV[1] job id  ARGV[2] tier (0 = highest)  ARGV[3] payload (bytes)
#   ARGV[4] deadline_ms  ARGV[5] tenant  ARGV[6] reply_to  ARGV[7] shape signature
#   ARGV[8] max_queue_size of the model (0 = unbounded)  ARGV[9] job TTL grace, ms
#   ARGV[10] batch items in the request (dim 0; 1 for a model that does not batch)
#   ARGV[11] the tenant's weight in its tier (> 0)
#   ARGV[12] the tenant's max queued requests for this model (0 = unbounded)
#   ARGV[13] how long a drain figure stays fresh, ms
# Returns {code, estimated wait ms}: code 1 enqueued, 0 duplicate id (idempotent
# retry), -1 model queue full, -2 the tenant's queue full, -3 it would wait past its
# deadline (the wait is the estimate). A refusal writes nothing.
ENQUEUE_LUA = """
local max_queue = tonumber(ARGV[8])
if max_queue > 0 and redis.call('ZCARD', KEYS[1]) >= max_queue then return {-1, 0} end
local tenant = ARGV[5]
local max_mine = tonumber(ARGV[12])
if max_mine > 0 and (tonumber(redis.call('HGET', KEYS[5], tenant)) or 0) >= max_mine then return {-2, 0} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {0, 0} end
local tier = tonumber(ARGV[2])
local finish = 'f' .. tier .. ':' .. tenant
local start = math.max(tonumber(redis.call('HGET', KEYS[4], 'c' .. tier)) or 0,
                       tonumber(redis.call('HGET', KEYS[4], finish)) or 0)
local score = string.format('%.17g', tier * 1099511627776 + start)
local wait = 0
local ahead = redis.call('ZCOUNT', KEYS[1], '-inf', '(' .. score)
if ahead > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local rate, fresh = 0, tonumber(ARGV[13])
  local drain = redis.call('HGETALL', KEYS[6])
  for i = 2, #drain, 2 do
    local per_job, seen = string.match(drain[i], '^(%S+) (%S+)$')
    if per_job and now - tonumber(seen) <= fresh and tonumber(per_job) > 0 then rate = rate + 1 / tonumber(per_job) end
  end
  if rate > 0 then
    wait = math.floor((ahead + 1) / rate)
    if now + wait > tonumber(ARGV[4]) then return {-3, wait} end
  end
end
redis.call('HSET', KEYS[4], finish, string.format('%.17g', start + tonumber(ARGV[10]) / tonumber(ARGV[11])))
redis.call('HSET', KEYS[2], 'p', ARGV[3], 'd', ARGV[4], 't', tenant, 'r', ARGV[6], 's', ARGV[7], 'a', 0,
           'q', score, 'n', ARGV[10])
redis.call('PEXPIREAT', KEYS[2], tonumber(ARGV[4]) + tonumber(ARGV[9]))
redis.call('ZADD', KEYS[1], score, ARGV[1])
redis.call('HINCRBY', KEYS[5], tenant, 1)
if redis.call('LLEN', KEYS[3]) == 0 then redis.call('RPUSH', KEYS[3], 1) end
return {1, wait}
"""

# CLAIM: take a batch, atomically.
#   KEYS[1] ready  KEYS[2] inflight  KEYS[3] wake  KEYS[4] fence  KEYS[5] sched  KEYS[6] queued
#   KEYS[7] drain
#   ARGV[1] job key prefix  ARGV[2] max batch items  ARGV[3] lease_ms  ARGV[4] worker id
#   ARGV[5] scan limit (how far past the head to look for same-shaped jobs)
#   ARGV[6] required shape signature ('' = the head's)
#   ARGV[7] lower-tier share: every Nth claim serves a lower tier with work (0 = off)
#   ARGV[8] number of tiers
#   ARGV[9] ms the batch will take (jobs due sooner cannot finish: they count as expired)
#   ARGV[10] the worker's recent ms per job on this model (0 = none yet), for shedding
# Walks the ready set in score order (highest tier, then lowest virtual start).
# Jobs past their deadline, or due before the batch could finish, are removed and
# returned as expired (never computed: under overload the worker spends itself on
# requests that can still make it, not on answers nobody waits for).
# Jobs whose shape signature differs from the batch's stay queued, and so do jobs
# whose items would overflow the batch (the sum of dim 0 never exceeds max items).
# Taken jobs move to inflight with a lease, get a fencing token, and count an
# attempt; each tier's virtual clock advances to the latest start it served.
# Returns {token, now_ms, {id, payload, ...}, {expired id, reply_to, ...}}.
CLAIM_LUA = """
local SPAN = 1099511627776
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prefix, room, scan = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[5])
local due = now + (tonumber(ARGV[9]) or 0)
local sig = ARGV[6]
if sig == '' then sig = nil end
local function unqueue(tenant)
  if tenant and redis.call('HINCRBY', KEYS[6], tenant, -1) <= 0 then redis.call('HDEL', KEYS[6], tenant) end
end
if redis.call('ZCARD', KEYS[1]) == 0 then return {0, now, {}, {}} end  -- nothing queued: touch nothing
if tonumber(ARGV[10]) > 0 then
  redis.call('HSET', KEYS[7], ARGV[4], ARGV[10] .. ' ' .. now)
  redis.call('PEXPIRE', KEYS[7], 60000)
end
local ids = nil
local every, tiers = tonumber(ARGV[7]), tonumber(ARGV[8])
if every > 0 then
  local turn = redis.call('HINCRBY', KEYS[5], 'turn', 1)
  if turn % every == 0 then
    local head = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    if #head > 0 then
      local top = math.floor(tonumber(head[2]) / SPAN)
      local lower = tiers - 1 - top
      for k = 0, lower - 1 do
        local tier = top + 1 + ((math.floor(turn / every) + k) % lower)
        local found = redis.call('ZRANGE', KEYS[1], string.format('%.17g', tier * SPAN),
                                 '(' .. string.format('%.17g', (tier + 1) * SPAN), 'BYSCORE', 'LIMIT', 0, scan)
        if #found > 0 then ids = found; break end
      end
    end
  end
end
if ids == nil then ids = redis.call('ZRANGE', KEYS[1], 0, scan - 1) end
local taken, expired, clocks = {}, {}, {}
for _, id in ipairs(ids) do
  local jk = prefix .. id
  local meta = redis.call('HMGET', jk, 'd', 's', 'r', 'n', 't', 'q')
  if not meta[1] then
    redis.call('ZREM', KEYS[1], id)
  elseif tonumber(meta[1]) <= due then
    redis.call('ZREM', KEYS[1], id)
    redis.call('DEL', jk)
    unqueue(meta[5])
    expired[#expired + 1] = id
    expired[#expired + 1] = meta[3]
  else
    if sig == nil then sig = meta[2] end
    local items = tonumber(meta[4]) or 1
    if meta[2] == sig and items <= room then
      taken[#taken + 1] = id
      unqueue(meta[5])
      local score = tonumber(meta[6]) or 0
      local tier = math.floor(score / SPAN)
      clocks[tier] = math.max(clocks[tier] or 0, score - tier * SPAN)
      room = room - items
      if room <= 0 then break end
    end
  end
end
for tier, clock in pairs(clocks) do
  if clock > (tonumber(redis.call('HGET', KEYS[5], 'c' .. tier)) or 0) then
    redis.call('HSET', KEYS[5], 'c' .. tier, string.format('%.17g', clock))
  end
end
local out = {}
local token = 0
if #taken > 0 then
  token = redis.call('INCR', KEYS[4])
  local expiry = now + tonumber(ARGV[3])
  for _, id in ipairs(taken) do
    local jk = prefix .. id
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZADD', KEYS[2], expiry, id)
    redis.call('HSET', jk, 'k', token, 'w', ARGV[4])
    redis.call('HINCRBY', jk, 'a', 1)
    out[#out + 1] = id
    out[#out + 1] = redis.call('HGET', jk, 'p')
  end
end
if redis.call('ZCARD', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[6])  -- nothing queued: every count is 0 (heals a count lost to an evicted job)
  if redis.call('ZCARD', KEYS[2]) == 0 then redis.call('DEL', KEYS[5], KEYS[7]) end  -- idle: reset virtual time
elseif redis.call('LLEN', KEYS[3]) == 0 then
  redis.call('RPUSH', KEYS[3], 1)
end
return {token, now, out, expired}
"""

# ACK: finish jobs of a lease, only with its current fencing token.
#   KEYS[1] inflight  KEYS[2] ready  KEYS[3] sched  KEYS[4] drain
#   ARGV[1] job key prefix  ARGV[2] token  ARGV[3..] job ids
# When the model goes idle (nothing queued, nothing leased) its scheduler state
# and drain figures are dropped: virtual time restarts at 0, the next claim says
# how fast its worker goes, and an idle model leaves no keys.
# Returns how many jobs were acked (a stale token acks none).
ACK_LUA = """
local n = 0
for i = 3, #ARGV do
  local jk = ARGV[1] .. ARGV[i]
  if redis.call('HGET', jk, 'k') == ARGV[2] then
    redis.call('ZREM', KEYS[1], ARGV[i])
    redis.call('DEL', jk)
    n = n + 1
  end
end
if redis.call('ZCARD', KEYS[1]) == 0 and redis.call('ZCARD', KEYS[2]) == 0 then redis.call('DEL', KEYS[3], KEYS[4]) end
return n
"""

# EXTEND: renew a lease while its batch computes (heartbeat).
#   KEYS[1] inflight  ARGV[1] job key prefix  ARGV[2] token  ARGV[3] lease_ms  ARGV[4..] job ids
# Only jobs still held under ``token`` are extended. Returns how many.
EXTEND_LUA = """
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
"""

# RELEASE: give back jobs a worker took but will not run (it is stopping).
#   KEYS[1] ready  KEYS[2] inflight  KEYS[3] wake  KEYS[4] queued
#   ARGV[1] job key prefix  ARGV[2] token  ARGV[3..] job ids
# Each goes back to its original place in the ready set; the attempt is not
# counted (the model never saw it). Returns how many.
RELEASE_LUA = """
local n = 0
for i = 3, #ARGV do
  local jk = ARGV[1] .. ARGV[i]
  if redis.call('HGET', jk, 'k') == ARGV[2] then
    redis.call('ZREM', KEYS[2], ARGV[i])
    redis.call('HDEL', jk, 'k', 'w')
    redis.call('HINCRBY', jk, 'a', -1)
    redis.call('ZADD', KEYS[1], redis.call('HGET', jk, 'q'), ARGV[i])
    redis.call('HINCRBY', KEYS[4], redis.call('HGET', jk, 't'), 1)
    n = n + 1
  end
end
if n > 0 and redis.call('LLEN', KEYS[3]) == 0 then redis.call('RPUSH', KEYS[3], 1) end
return n
"""

# REAP: return the jobs of expired leases (a dead or stuck worker) to the queue.
#   KEYS[1] ready  KEYS[2] inflight  KEYS[3] wake  KEYS[4] queued
#   ARGV[1] job key prefix  ARGV[2] max attempts  ARGV[3] max jobs per call
# A reaped job goes back to its original place (the head of its tier, as it was
# among the oldest), keeping its deadline, trace and payload. A job that has been
# claimed ``max attempts`` times is not redelivered: it is removed and returned so
# its caller can be answered (a poison input must not kill worker after worker).
# Safe to run from any number of processes: each call is atomic and idempotent.
# Returns {requeued count, {dead id, reply_to, attempts, ...}}.
REAP_LUA = """
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
      redis.call('DEL', jk)
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
return {requeued, dead}
"""


# WITHDRAW: the caller gave up (cancelled, or its deadline passed in the gateway):
# remove its job if no worker holds it yet, so it is never computed for nobody.
#   KEYS[1] ready  KEYS[2] job hash  KEYS[3] queued  ARGV[1] job id
# Returns 1 withdrawn, 0 already leased, finished or gone.
WITHDRAW_LUA = """
if redis.call('HEXISTS', KEYS[2], 'k') == 1 then return 0 end
local tenant = redis.call('HGET', KEYS[2], 't')
redis.call('DEL', KEYS[2])
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
if removed == 1 and tenant and redis.call('HINCRBY', KEYS[3], tenant, -1) <= 0 then
  redis.call('HDEL', KEYS[3], tenant)
end
return removed
"""


# REWAKE: give back a wake token a worker took for a model it no longer serves,
# so that a worker that does serve it takes the work.
#   KEYS[1] wake  KEYS[2] ready
# Pushed only while jobs are queued and the list is empty (it holds at most one
# token). Returns 1 pushed, 0 not needed.
REWAKE_LUA = """
if redis.call('ZCARD', KEYS[2]) > 0 and redis.call('LLEN', KEYS[1]) == 0 then
  redis.call('RPUSH', KEYS[1], 1)
  return 1
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Reaped:
    """What one REAP did: jobs put back, and jobs out of attempts (id, reply_to, attempts)."""

    requeued: int
    dead: list[tuple[str, str, int]]


@dataclass(frozen=True, slots=True)
class ClaimedBatch:
    """What one CLAIM returned: the lease token, Redis time, jobs and expired jobs."""

    token: int
    now_ms: int
    jobs: list[tuple[str, bytes]]
    expired: list[tuple[str, str]]


class ClaimOptions(TypedDict, total=False):
    """A claim's options. With ``lower_share_every`` N > 0, every Nth claim of the
    model serves a lower tier that has work (the lower tiers take turns), so none
    starves. ``batch_ms`` is how long the batch is expected to take: a job whose
    deadline comes sooner is expired instead of taken. ``ms_per_job`` is the
    worker's recent time per job of this model, recorded for enqueue's shedding.
    ``scan_limit`` is how far past the head to look for same-shaped jobs."""

    max_items: Required[int]
    lease_ms: Required[int]
    worker_id: Required[str]
    signature: str  # '' = the head's shape
    scan_limit: int
    lower_share_every: int
    batch_ms: int
    ms_per_job: float


@dataclass(frozen=True, slots=True)
class Enqueued:
    """ENQUEUE's answer. ``code``: 1 enqueued, 0 a duplicate id (an idempotent
    retry), -1 the model's queue is full, -2 the tenant's queue for this model is
    full, -3 the request would wait past its deadline. ``wait_ms``: the estimated
    wait behind the jobs ahead (0 when there was nothing to estimate)."""

    code: int
    wait_ms: int

    ENQUEUED = 1
    DUPLICATE = 0
    MODEL_QUEUE_FULL = -1
    TENANT_QUEUE_FULL = -2
    PAST_DEADLINE = -3


ENQUEUE = Script(ENQUEUE_LUA)
CLAIM = Script(CLAIM_LUA)
ACK = Script(ACK_LUA)
EXTEND = Script(EXTEND_LUA)
RELEASE = Script(RELEASE_LUA)
REAP = Script(REAP_LUA)
WITHDRAW = Script(WITHDRAW_LUA)
REWAKE = Script(REWAKE_LUA)


class QueueProtocol:
    """The scripts, registered once per Redis client; every call is one round trip.

    Scripts run by SHA; the link loads one and runs it again on NOSCRIPT, so a
    restarted Redis is handled transparently.
    """

    def __init__(self, redis: RedisLink) -> None:
        self.redis = redis

    async def enqueue(
        self,
        keys: ModelKeys,
        job_id: str,
        *,
        tier: int,
        payload: bytes,
        deadline_ms: int,
        tenant: str,
        reply_to: str,
        signature: str,
        max_queue_size: int,
        items: int = 1,
        weight: float = 1.0,
        tenant_max_queued: int = 0,
    ) -> Enqueued:
        """Put one job on a model's ready set, or refuse it (see :class:`Enqueued`).

        ``items`` is the request's batch size: claims fill batches by items, not
        jobs, and fair queuing charges a tenant ``items / weight`` per job.
        """
        code, wait_ms = await self.redis.script(
            ENQUEUE,
            keys=[keys.ready, keys.job(job_id), keys.wake, keys.sched, keys.queued, keys.drain],
            args=[
                job_id,
                tier,
                payload,
                deadline_ms,
                tenant,
                reply_to,
                signature,
                max_queue_size,
                JOB_TTL_GRACE_MS,
                items,
                weight,
                tenant_max_queued,
                DRAIN_FRESH_MS,
            ],
        )
        return Enqueued(int(code), int(wait_ms))

    async def claim(self, keys: ModelKeys, **options: Unpack[ClaimOptions]) -> ClaimedBatch:
        """Lease up to ``max_items`` same-shaped jobs from the head of the queue
        (the options are :class:`ClaimOptions`)."""
        return parse_claim(await self.redis.script(CLAIM, *claim_keys_args(keys, **options)))

    async def ack(self, keys: ModelKeys, token: int, job_ids: list[str]) -> int:
        """Remove finished jobs of the lease ``token``; returns how many were still held."""
        if not job_ids:
            return 0
        return int(await self.redis.script(ACK, *_ack_keys_args(keys, token, job_ids)))

    async def load_ack_script(self) -> None:
        """Load ACK's script now, so that pipelines calling :func:`ack_command` find it."""
        await self.redis.load(ACK)

    async def extend(self, keys: ModelKeys, token: int, job_ids: list[str], lease_ms: int) -> int:
        """Renew the lease ``token`` on these jobs; 0 if it was reclaimed meanwhile."""
        if not job_ids:
            return 0
        return int(
            await self.redis.script(EXTEND, keys=[keys.inflight], args=[keys.job_prefix, token, lease_ms, *job_ids])
        )

    async def release(self, keys: ModelKeys, token: int, job_ids: list[str]) -> int:
        """Put jobs taken under ``token`` but never run back in their place."""
        if not job_ids:
            return 0
        return int(
            await self.redis.script(
                RELEASE,
                keys=[keys.ready, keys.inflight, keys.wake, keys.queued],
                args=[keys.job_prefix, token, *job_ids],
            )
        )

    async def withdraw(self, keys: ModelKeys, job_id: str) -> bool:
        """Remove a job no one holds yet; False if a worker already leased it."""
        return bool(await self.redis.script(WITHDRAW, keys=[keys.ready, keys.job(job_id), keys.queued], args=[job_id]))

    async def rewake(self, keys: ModelKeys) -> bool:
        """Give back a wake token taken for a model this worker dropped; False: not needed."""
        return bool(await self.redis.script(REWAKE, keys=[keys.wake, keys.ready]))

    async def reap(self, keys: ModelKeys, *, max_attempts: int, limit: int = 256) -> Reaped:
        """Redeliver the jobs of expired leases; hand back those out of attempts."""
        requeued, flat = await self.redis.script(
            REAP, keys=[keys.ready, keys.inflight, keys.wake, keys.queued], args=[keys.job_prefix, max_attempts, limit]
        )
        dead = [(_text(flat[i]), _text(flat[i + 1]), int(flat[i + 2])) for i in range(0, len(flat), 3)]
        return Reaped(int(requeued), dead)


def claim_keys_args(keys: ModelKeys, **options: Unpack[ClaimOptions]) -> tuple[list[Any], list[Any]]:
    """CLAIM's keys and arguments; ``CLAIM.call(*...)`` makes the command to pipeline
    after a blocking pop, :func:`parse_claim` reads its reply."""
    max_items = options["max_items"]
    ms_per_job = options.get("ms_per_job", 0.0)
    scan = options.get("scan_limit") or max(4 * max_items, 16)
    return (
        [keys.ready, keys.inflight, keys.wake, keys.fence, keys.sched, keys.queued, keys.drain],
        [
            keys.job_prefix,
            max_items,
            options["lease_ms"],
            options["worker_id"],
            scan,
            options.get("signature", ""),
            options.get("lower_share_every", 0),
            NUM_TIERS,
            options.get("batch_ms", 0),
            f"{ms_per_job:.4f}" if ms_per_job > 0 else 0,
        ],
    )


def parse_claim(raw: list[Any]) -> ClaimedBatch:
    token, now_ms, flat_jobs, flat_expired = raw
    jobs = [(_text(flat_jobs[i]), bytes(flat_jobs[i + 1])) for i in range(0, len(flat_jobs), 2)]
    expired = [(_text(flat_expired[i]), _text(flat_expired[i + 1])) for i in range(0, len(flat_expired), 2)]
    return ClaimedBatch(int(token), int(now_ms), jobs, expired)


def ack_command(keys: ModelKeys, token: int, job_ids: list[str]) -> tuple[Any, ...]:
    """ACK as one command for a pipeline, by SHA alone: its reply there is a
    ``NoScriptError`` if Redis lost its script cache (a restart); the caller then
    acks with :meth:`QueueProtocol.ack`, which loads the script."""
    return ACK.call(*_ack_keys_args(keys, token, job_ids))


def _ack_keys_args(keys: ModelKeys, token: int, job_ids: list[str]) -> tuple[list[Any], list[Any]]:
    return [keys.inflight, keys.ready, keys.sched, keys.drain], [keys.job_prefix, token, *job_ids]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
