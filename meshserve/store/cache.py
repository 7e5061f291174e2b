"""The response cache's Redis side: its keys, its two scripts, and the calls to them.

Per model version, three keys under one Cluster hash tag ``{c:<model>:<version>}``:

- ``entries``: a hash, entry -> the serialized response (bytes);
- ``expiry``: a sorted set, entry -> expiry (epoch ms); entries come in with the
  same TTL, so its order is also their age, and the oldest is evicted first;
- ``sizes``: a hash, entry -> bytes held, and ``total`` -> their sum.

An entry is ``<namespace>:<digest>``, the namespace the tenant's name (or ``*`` for
a model whose cache is shared). The cap is enforced by the store script: before it
adds an entry it drops up to ``EXPIRED_PER_STORE`` expired entries, then the oldest
entries until the new one fits under the cap. Every store sets the three keys'
TTL to the entries', so a cache nobody writes to goes away whole. The store never
relies on Redis evicting (the queue store runs ``noeviction``): a store Redis
refuses (``OOM`` at its maxmemory) is the caller's to skip. Time comes from Redis
``TIME``. The sizes counted are the responses' bytes, not Redis's overhead per entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshserve.store.link import RedisLink, Script

EXPIRED_PER_STORE = 64
"""Expired entries a store drops at most (its work stays bounded)."""

_NOW_MS = "local t = redis.call('TIME')\nlocal now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"

LOOKUP = Script(
    """-- KEYS[1] entries (hash), KEYS[2] expiry (zset, epoch ms)
-- ARGV[1] entry
-- returns: the response's bytes, or false (absent or expired)
"""
    + _NOW_MS
    + """local expires = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not expires or tonumber(expires) <= now_ms then
  return false
end
return redis.call('HGET', KEYS[1], ARGV[1])
"""
)

STORE = Script(
    """-- KEYS[1] entries (hash), KEYS[2] expiry (zset, epoch ms), KEYS[3] sizes (hash, bytes; 'total')
-- ARGV[1] entry, ARGV[2] response bytes, ARGV[3] ttl ms, ARGV[4] cap bytes, ARGV[5] expired to drop at most
-- returns: {bytes held after, entries evicted for room, expired entries dropped, stored (1/0)}
"""
    + _NOW_MS
    + """local size, ttl_ms, cap = #ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local total = tonumber(redis.call('HGET', KEYS[3], 'total') or '0')
local function drop(entry)
  total = total - tonumber(redis.call('HGET', KEYS[3], entry) or '0')
  redis.call('HDEL', KEYS[1], entry)
  redis.call('HDEL', KEYS[3], entry)
  redis.call('ZREM', KEYS[2], entry)
end
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now_ms, 'LIMIT', 0, tonumber(ARGV[5]))
for _, entry in ipairs(expired) do drop(entry) end
drop(ARGV[1])
local evicted, stored = 0, 0
if size <= cap then
  while total + size > cap do
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
    if not oldest then break end
    drop(oldest)
    evicted = evicted + 1
  end
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('ZADD', KEYS[2], now_ms + ttl_ms, ARGV[1])
  redis.call('HSET', KEYS[3], ARGV[1], size)
  total = total + size
  stored = 1
end
redis.call('HSET', KEYS[3], 'total', total)
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ttl_ms) end
return {total, evicted, #expired, stored}
"""
)


@dataclass(frozen=True, slots=True)
class CacheKeys:
    """The keys of one model version's cache, with its hash tag."""

    entries: str
    expiry: str
    sizes: str

    @classmethod
    def for_model(cls, model: str, version: int) -> CacheKeys:
        base = f"ms:{{c:{model}:{version}}}:"
        return cls(entries=base + "entries", expiry=base + "expiry", sizes=base + "sizes")


@dataclass(frozen=True, slots=True)
class Stored:
    """What a store did: bytes the model version's cache holds after it, entries
    evicted to make room, expired entries dropped, and whether the entry went in
    (not when it alone is over the cap)."""

    held_bytes: int
    evicted: int
    expired: int
    stored: bool


async def lookup(redis: RedisLink, keys: CacheKeys, entry: str) -> bytes | memoryview | None:
    """The entry's response bytes (a large one as the buffer the reply was received
    into, not copied: :mod:`meshserve.store.resp`); None when absent or expired. One round trip."""
    found = await redis.script(LOOKUP, (keys.entries, keys.expiry), (entry,))
    return found if found else None


async def store(
    redis: RedisLink, keys: CacheKeys, entry: str, response: bytes, *, ttl_ms: int, cap_bytes: int
) -> Stored:
    """Add (or replace) an entry within the cap; raises RedisError (e.g. OOM)."""
    held, evicted, expired, stored = await redis.script(
        STORE,
        (keys.entries, keys.expiry, keys.sizes),
        (entry, response, max(1, ttl_ms), cap_bytes, EXPIRED_PER_STORE),
    )
    return Stored(int(held), int(evicted), int(expired), bool(stored))
