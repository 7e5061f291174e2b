"""Per-tenant admission on a real Redis: GCRA rate limit, in-flight cap, no state left.

Time is driven by the script's test-only ``now_us`` argument, starting from Redis's
own clock, so refills are exact and nothing sleeps. The flood tests use Redis TIME
with a rate so low that no token can refill while they run.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from redis.asyncio import Redis

from meshserve.store.link import RedisLink
from meshserve.tenancy.admission import INFLIGHT_GRACE_MS, Admission, Decision, TenantKeys
from meshserve.tenancy.tenants import Tenant

MS = 1_000  # µs


def tenant(name: str = "acme", *, rate_per_s: float = 0.0, burst: int = 0, max_inflight: int = 0) -> Tenant:
    return Tenant(name, frozenset(), 1, 1.0, rate_per_s, burst, max_inflight, 0, ("*",))


@pytest.fixture
def admission(link: RedisLink) -> Admission:
    return Admission(link)


async def redis_now_us(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1_000_000 + int(micros)


def text(value: object) -> str:
    assert isinstance(value, bytes), value
    return value.decode()


async def tenant_keys(redis: Redis, pattern: str = "ms:{t:*") -> set[str]:
    return {text(key) for key in await redis.keys(pattern)}


async def test_burst_is_admitted_then_limited_with_a_retry_hint(admission: Admission, redis: Redis) -> None:
    acme = tenant(rate_per_s=10, burst=3)  # one request per 100 ms, three at once
    t0 = await redis_now_us(redis)
    deadline_ms = t0 // MS + 60_000
    for i in range(3):
        assert (await admission.admit(acme, f"r{i}", deadline_ms=deadline_ms, now_us=t0)).ok
    refused = await admission.admit(acme, "r3", deadline_ms=deadline_ms, now_us=t0)
    assert refused == Decision(ok=False, reason="rate", retry_after_ms=100)
    assert "over its rate limit of 10 requests/s" in refused.describe(acme)

    later = await admission.admit(acme, "r3", deadline_ms=deadline_ms, now_us=t0 + 40 * MS)
    assert later == Decision(ok=False, reason="rate", retry_after_ms=60)  # the hint counts down
    # After the hinted wait, exactly one more is admitted, then the next waits a full interval.
    assert (await admission.admit(acme, "r3", deadline_ms=deadline_ms, now_us=t0 + 100 * MS)).ok
    assert (await admission.admit(acme, "r4", deadline_ms=deadline_ms, now_us=t0 + 100 * MS)).retry_after_ms == 100


async def test_an_idle_tenant_refills_to_its_burst_and_no_further(admission: Admission, redis: Redis) -> None:
    acme = tenant(rate_per_s=10, burst=3)
    t0 = await redis_now_us(redis)
    deadline_ms = t0 // MS + 60_000
    for i in range(3):
        assert (await admission.admit(acme, f"a{i}", deadline_ms=deadline_ms, now_us=t0)).ok
    for i in range(3):
        await admission.release(acme, f"a{i}")
    t1 = t0 + 10_000 * MS  # long idle: the burst is back, but only the burst
    results = [await admission.admit(acme, f"b{i}", deadline_ms=deadline_ms, now_us=t1) for i in range(4)]
    assert [result.ok for result in results] == [True, True, True, False]


async def test_tat_key_expires_when_it_would_no_longer_matter(admission: Admission, redis: Redis) -> None:
    acme = tenant(rate_per_s=0.01, burst=3)  # one request per 100 s
    keys = TenantKeys.for_tenant("acme")
    t0 = await redis_now_us(redis)
    await admission.admit(acme, "r", deadline_ms=t0 // MS + 60_000, now_us=t0)
    await admission.release(acme, "r")
    # One request put the TAT 100 s ahead of now; after that it is as good as absent.
    assert 0 < await redis.pttl(keys.tat) <= 100_000
    assert await tenant_keys(redis) == {keys.tat}


async def test_inflight_cap_refuses_until_a_release(admission: Admission, redis: Redis) -> None:
    acme = tenant(max_inflight=2)
    deadline_ms = (await redis_now_us(redis)) // MS + 60_000
    assert (await admission.admit(acme, "a", deadline_ms=deadline_ms)).ok
    assert (await admission.admit(acme, "b", deadline_ms=deadline_ms)).ok
    refused = await admission.admit(acme, "c", deadline_ms=deadline_ms)
    assert refused == Decision(ok=False, reason="inflight", retry_after_ms=0)
    assert "2 requests in flight" in refused.describe(acme)
    assert await admission.release(acme, "a")
    assert (await admission.admit(acme, "c", deadline_ms=deadline_ms)).ok
    assert await admission.inflight(acme) == 2


async def test_a_rejection_changes_nothing(admission: Admission, redis: Redis) -> None:
    keys = TenantKeys.for_tenant("acme")
    t0 = await redis_now_us(redis)
    deadline_ms = t0 // MS + 60_000
    # Rate: another gateway left a TAT far ahead; the refusal must not create inflight.
    far_tat = str(t0 + 3_600_000 * MS)
    await redis.set(keys.tat, far_tat, px=3_600_000)
    rate_limited = tenant(rate_per_s=1, burst=1, max_inflight=5)
    decision = await admission.admit(rate_limited, "x", deadline_ms=deadline_ms, now_us=t0)
    assert decision.reason == "rate"
    assert await tenant_keys(redis) == {keys.tat}
    assert text(await redis.get(keys.tat)) == far_tat

    # In flight: a full set refuses without charging the rate or touching the set.
    await redis.flushdb()
    capped = tenant(rate_per_s=10, burst=5, max_inflight=1)
    assert (await admission.admit(capped, "a", deadline_ms=deadline_ms, now_us=t0)).ok
    tat_before = await redis.get(keys.tat)
    members_before = await redis.zrange(keys.inflight, 0, -1, withscores=True)
    assert (await admission.admit(capped, "b", deadline_ms=deadline_ms, now_us=t0)).reason == "inflight"
    assert await redis.get(keys.tat) == tat_before
    assert await redis.zrange(keys.inflight, 0, -1, withscores=True) == members_before


async def test_release_is_idempotent_and_never_goes_below_zero(admission: Admission, redis: Redis) -> None:
    acme = tenant(max_inflight=1)
    deadline_ms = (await redis_now_us(redis)) // MS + 60_000
    assert not await admission.release(acme, "never-admitted")
    assert (await admission.admit(acme, "a", deadline_ms=deadline_ms)).ok
    assert await admission.release(acme, "a")
    assert not await admission.release(acme, "a")  # a second release frees nothing more
    assert await admission.inflight(acme) == 0
    assert await tenant_keys(redis) == set()
    # The cap still holds after the double release.
    assert (await admission.admit(acme, "b", deadline_ms=deadline_ms)).ok
    assert not (await admission.admit(acme, "c", deadline_ms=deadline_ms)).ok


async def test_entries_of_a_dead_gateway_stop_counting_at_their_deadline(admission: Admission, redis: Redis) -> None:
    acme = tenant(max_inflight=1)
    keys = TenantKeys.for_tenant("acme")
    t0 = await redis_now_us(redis)
    deadline_ms = t0 // MS + 60_000
    assert (await admission.admit(acme, "orphan", deadline_ms=deadline_ms, now_us=t0)).ok  # never released
    # The key lives until the entry's expiry, and no longer.
    assert 0 < await redis.pttl(keys.inflight) <= 60_000 + INFLIGHT_GRACE_MS
    assert not (await admission.admit(acme, "b", deadline_ms=deadline_ms, now_us=t0 + 59_000 * MS)).ok
    after_expiry = t0 + (60_000 + INFLIGHT_GRACE_MS + 1) * MS
    assert (await admission.admit(acme, "b", deadline_ms=deadline_ms + 60_000, now_us=after_expiry)).ok
    assert [text(m) for m in await redis.zrange(keys.inflight, 0, -1)] == ["b"]  # the orphan was pruned


async def test_no_rate_limit_leaves_no_tat_key(admission: Admission, redis: Redis) -> None:
    acme = tenant()
    deadline_ms = (await redis_now_us(redis)) // MS + 60_000
    decisions = [await admission.admit(acme, f"r{i}", deadline_ms=deadline_ms) for i in range(50)]
    assert all(decision.ok for decision in decisions)
    assert await tenant_keys(redis) == {TenantKeys.for_tenant("acme").inflight}


async def test_flood_then_release_leaves_counters_at_zero(admission: Admission, redis: Redis) -> None:
    # 1 request per 1000 s: nothing refills while the test runs, so counts are exact.
    acme = tenant("acme", rate_per_s=0.001, burst=50, max_inflight=30)
    beta = tenant("beta", rate_per_s=0.001, burst=20)
    owners = {"acme": acme, "beta": beta}
    deadline_ms = (await redis_now_us(redis)) // MS + 60_000
    connections = asyncio.Semaphore(64)  # the client's pool holds 100

    async def one(who: Tenant, i: int) -> tuple[str, Decision]:
        request_id = f"{who.name}-{i}"
        async with connections:
            return request_id, await admission.admit(who, request_id, deadline_ms=deadline_ms)

    async def release(request_id: str) -> bool:
        async with connections:
            return await admission.release(owners[request_id.split("-")[0]], request_id)

    results = await asyncio.gather(*(one(who, i) for i in range(200) for who in (acme, beta)))
    admitted = [(request_id, decision) for request_id, decision in results if decision.ok]
    by_tenant = {name: sum(rid.startswith(name) for rid, _ in admitted) for name in ("acme", "beta")}
    assert by_tenant == {"acme": 30, "beta": 20}  # acme held by its in-flight cap, beta by its burst
    reasons = {(rid.split("-")[0], d.reason) for rid, d in results if not d.ok}
    assert reasons == {("acme", "inflight"), ("beta", "rate")}
    assert await admission.inflight(acme) == 30

    released = await asyncio.gather(*(release(rid) for rid, _ in admitted))
    assert all(released)
    assert await admission.inflight(acme) == await admission.inflight(beta) == 0
    # Only the TAT keys remain, each with a TTL; the in-flight sets are gone.
    remaining = await tenant_keys(redis)
    assert remaining == {TenantKeys.for_tenant("acme").tat, TenantKeys.for_tenant("beta").tat}
    for key in remaining:
        assert await redis.pttl(key) > 0


async def test_keys_share_the_tenant_hash_tag(admission: Admission, redis: Redis) -> None:
    acme = tenant(rate_per_s=5, burst=1)
    await admission.admit(acme, "r", deadline_ms=(await redis_now_us(redis)) // MS + 60_000)
    keys = await tenant_keys(redis, "*")
    assert keys
    assert all("{t:acme}" in key for key in keys), keys


async def test_admission_survives_a_flushed_script_cache(admission: Admission, redis: Redis) -> None:
    deadline_ms = (await redis_now_us(redis)) // MS + 60_000
    assert (await admission.admit(tenant(), "a", deadline_ms=deadline_ms)).ok
    await redis.script_flush()
    assert (await admission.admit(tenant(), "b", deadline_ms=deadline_ms)).ok


def test_decision_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Decision(ok=True).ok = False  # type: ignore[misc]
