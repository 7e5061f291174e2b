"""Per-tenant admission in Redis: rate limit and in-flight cap, one atomic call per request.

The limits hold across any number of gateway replicas because their state lives in
Redis and each decision is one Lua script. Keys of one tenant share the Cluster hash
tag ``{t:<tenant>}``:

    ms:{t:<tenant>}:tat        STR   GCRA theoretical arrival time, Redis clock µs
    ms:{t:<tenant>}:inflight   ZSET  request id -> entry expiry, Redis clock ms

A rejection writes nothing. Idle tenants leave nothing behind: ``tat`` expires when it
would be in the past (a missing TAT means "idle, full burst available"), and
``inflight`` disappears with its last member, or by TTL at its latest entry's expiry.

In flight means admitted and not yet answered, across all gateways. It is a sorted set
of request ids, not a counter, so that

- release is idempotent: releasing twice, or a request never admitted, cannot push the
  count below the truth or free another request's slot;
- a gateway killed between admit and release leaks nothing for long: its entries stop
  counting at their expiry (the request's deadline plus ``INFLIGHT_GRACE_MS``) and are
  pruned by the next admit, or vanish with the key's TTL.

Time comes from Redis ``TIME``. ``now_us`` arguments stand in for it in tests only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from meshserve.store.link import RedisLink, Script
from meshserve.tenancy.tenants import Tenant
from meshserve.tenancy.throttle import rate_refusal_message

INFLIGHT_GRACE_MS = 1_000
"""An in-flight entry outlives its request's deadline by this much (clock skew between
the gateway that set the deadline and Redis) before it stops counting."""

MIN_INTERVAL_US = 1
"""Rates above 1 000 000 requests/s are treated as that (the interval is whole µs)."""

Reason = Literal["", "rate", "inflight"]
_REFUSALS: dict[str, Reason] = {"rate": "rate", "inflight": "inflight"}


@dataclass(frozen=True, slots=True)
class TenantKeys:
    """All admission keys of one tenant, with its hash tag."""

    tat: str
    inflight: str

    @classmethod
    def for_tenant(cls, tenant: str) -> TenantKeys:
        base = f"ms:{{t:{tenant}}}:"
        return cls(tat=base + "tat", inflight=base + "inflight")


# ADMIT: one atomic call per request, before anything is enqueued.
#   KEYS[1] tat  KEYS[2] inflight
#   ARGV[1] emission interval, µs (1e6 / rate_per_s; 0 = no rate limit)
#   ARGV[2] burst: requests admitted at once from idle
#   ARGV[3] max_inflight (0 = no limit)
#   ARGV[4] request id  ARGV[5] in-flight entry expiry, epoch ms (deadline + grace)
#   ARGV[6] now, epoch µs ('' = Redis TIME; tests only)
# GCRA (as go-redis/redis_rate): new_tat = max(tat, now) + interval, admitted when
# now >= new_tat - burst * interval. In-flight entries whose expiry has passed do not
# count. Every check runs before any write, so a rejection changes nothing.
# On admission: TAT set with a TTL that ends when it would be in the past; the
# request id added to inflight, stale entries pruned, the key's TTL moved to its
# latest entry's expiry.
# Returns {1, '', 0} admitted, {0, 'rate', retry_after_ms} or {0, 'inflight', 0}.
ADMIT_LUA = """
local now
if ARGV[6] ~= '' then
  now = tonumber(ARGV[6])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local now_ms = math.floor(now / 1000)
local interval = tonumber(ARGV[1])
local new_tat = 0
if interval > 0 then
  local tat = tonumber(redis.call('GET', KEYS[1]) or 0)
  if tat < now then tat = now end
  new_tat = tat + interval
  local allow_at = new_tat - tonumber(ARGV[2]) * interval
  if now < allow_at then
    return {0, 'rate', math.ceil((allow_at - now) / 1000)}
  end
end
local max_inflight = tonumber(ARGV[3])
if max_inflight > 0 and
   redis.call('ZCOUNT', KEYS[2], string.format('(%d', now_ms), '+inf') >= max_inflight then
  return {0, 'inflight', 0}
end
if interval > 0 then
  redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms)
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[4])
local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
local ttl = tonumber(last[2]) - now_ms
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) else redis.call('DEL', KEYS[2]) end
return {1, '', 0}
"""


@dataclass(frozen=True, slots=True)
class Decision:
    """One admission answer. ``retry_after_ms`` is set only for ``reason == "rate"``:
    the wait after which the same request would be admitted (if nothing else came)."""

    ok: bool
    reason: Reason = ""
    retry_after_ms: int = 0

    def describe(self, tenant: Tenant) -> str:
        """A message for the RESOURCE_EXHAUSTED answer, naming the limit."""
        if self.reason == "rate":
            return rate_refusal_message(tenant, self.retry_after_ms)
        if self.reason == "inflight":
            return f"tenant '{tenant.name}' has {tenant.max_inflight} requests in flight, its limit"
        return "admitted"


ADMITTED = Decision(ok=True)

ADMIT = Script(ADMIT_LUA)


class Admission:
    """The admission script, registered once per Redis client; one round trip a call.

    The caller owns each admitted request's release: ``admit`` in the gateway, then
    ``release`` in a ``finally`` once the call is answered, whatever the answer.
    """

    def __init__(self, redis: RedisLink) -> None:
        self.redis = redis

    async def admit(self, tenant: Tenant, request_id: str, *, deadline_ms: int, now_us: int | None = None) -> Decision:
        """Admit one request of ``tenant`` or say which limit refuses it, atomically.

        ``deadline_ms`` (absolute epoch ms) bounds how long the in-flight entry counts
        if it is never released. ``now_us`` replaces Redis TIME, for tests only.
        """
        keys = TenantKeys.for_tenant(tenant.name)
        interval_us = max(MIN_INTERVAL_US, round(1_000_000 / tenant.rate_per_s)) if tenant.rate_per_s > 0 else 0
        raw: list[Any] = await self.redis.script(
            ADMIT,
            keys=[keys.tat, keys.inflight],
            args=[
                interval_us,
                tenant.burst,
                tenant.max_inflight,
                request_id,
                deadline_ms + INFLIGHT_GRACE_MS,
                "" if now_us is None else now_us,
            ],
        )
        ok, reason, retry_after_ms = raw
        if ok:
            return ADMITTED
        return Decision(
            ok=False,
            reason=_REFUSALS[reason.decode() if isinstance(reason, bytes) else reason],
            retry_after_ms=int(retry_after_ms),
        )

    async def release(self, tenant: Tenant, request_id: str) -> bool:
        """End an admitted request's slot; False if it was not (or no longer) held.

        A single ZREM: atomic, idempotent, and Redis deletes the set with its last member.
        """
        return bool(await self.redis.execute("ZREM", TenantKeys.for_tenant(tenant.name).inflight, request_id))

    async def inflight(self, tenant: Tenant) -> int:
        """Entries in the tenant's in-flight set (for metrics and tests); may include
        expired entries of a dead gateway until the next admit prunes them."""
        return int(await self.redis.execute("ZCARD", TenantKeys.for_tenant(tenant.name).inflight))
