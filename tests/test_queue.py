"""The queue protocol on a real Redis: ordering, batching by shape, deadlines,
leases with fencing tokens, redelivery, dead-lettering, and script reloads.

Lease expiry is made deterministic with ``lease_ms=0``: the lease expires at the
claim's own Redis time, so the next REAP sees it, with no waiting.
"""

from __future__ import annotations

import time

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from meshserve.queue import (
    REPLY_TTL_S,
    TIER_NAMES,
    TIER_SPAN,
    ModelKeys,
    QueueProtocol,
    pop_replies,
    pop_replies_now,
    push_commands,
    queue_depths,
    reply_key,
    wait_command,
    woken_key,
    worker_wake_key,
)
from meshserve.store.link import RedisLink
from meshserve_bench.redis_cost import snapshot

KEYS = ModelKeys.for_model("m", 1)
FAR_MS = 10**13  # a deadline far in the future (epoch ms)


@pytest.fixture
def queue(link: RedisLink) -> QueueProtocol:
    return QueueProtocol(link)


async def put(
    queue: QueueProtocol,
    job_id: str,
    *,
    tier: int = 1,
    deadline_ms: int = FAR_MS,
    signature: str = "4",
    max_queue_size: int = 0,
) -> int:
    enqueued = await queue.enqueue(
        KEYS,
        job_id,
        tier=tier,
        payload=f"payload-{job_id}".encode(),
        deadline_ms=deadline_ms,
        tenant="t",
        reply_to="replies",
        signature=signature,
        max_queue_size=max_queue_size,
    )
    return enqueued.code


async def test_keys_share_the_model_hash_tag(queue: QueueProtocol, redis: Redis) -> None:
    await put(queue, "a")
    await queue.claim(KEYS, max_items=1, lease_ms=1000, worker_id="w")
    keys = {k.decode() for k in await redis.keys("*")}
    assert keys
    assert all("{m:m:1}" in k for k in keys), keys


async def test_enqueue_is_idempotent_by_id_and_bounded(queue: QueueProtocol, redis: Redis) -> None:
    assert await put(queue, "a") == 1
    assert await put(queue, "a") == 0  # a retried enqueue creates no duplicate
    assert await redis.zcard(KEYS.ready) == 1
    assert await put(queue, "b", max_queue_size=1) == -1  # full: refused before anything is written
    assert not await redis.exists(KEYS.job("b"))


async def test_claim_takes_highest_tier_first_then_oldest(queue: QueueProtocol) -> None:
    for job_id, tier in [("low1", 2), ("mid1", 1), ("high1", 0), ("low2", 2), ("high2", 0)]:
        await put(queue, job_id, tier=tier)
    order = []
    for _ in range(5):
        batch = await queue.claim(KEYS, max_items=1, lease_ms=1000, worker_id="w")
        order += [job_id for job_id, _ in batch.jobs]
    assert order == ["high1", "high2", "mid1", "low1", "low2"]


async def test_claim_batches_only_same_shaped_jobs(queue: QueueProtocol, redis: Redis) -> None:
    for job_id, sig in [("a", "8,8"), ("b", "4,4"), ("c", "8,8"), ("d", "8,8")]:
        await put(queue, job_id, signature=sig)
    batch = await queue.claim(KEYS, max_items=8, lease_ms=1000, worker_id="w")
    assert [job_id for job_id, _ in batch.jobs] == ["a", "c", "d"]
    assert dict(batch.jobs)["a"] == b"payload-a"
    assert [m.decode() for m in await redis.zrange(KEYS.ready, 0, -1)] == ["b"]
    only = await queue.claim(KEYS, max_items=8, lease_ms=1000, worker_id="w", signature="8,8")
    assert only.jobs == []  # a required signature never takes another shape


async def test_expired_jobs_are_dropped_at_claim_and_never_handed_out(queue: QueueProtocol, redis: Redis) -> None:
    past_ms = int(time.time() * 1000) - 1000
    await put(queue, "late", deadline_ms=past_ms)
    await put(queue, "ok")
    batch = await queue.claim(KEYS, max_items=8, lease_ms=1000, worker_id="w")
    assert [job_id for job_id, _ in batch.jobs] == ["ok"]
    assert batch.expired == [("late", "replies")]
    assert not await redis.exists(KEYS.job("late"))


async def test_ack_needs_the_current_token(queue: QueueProtocol, redis: Redis) -> None:
    await put(queue, "a")
    batch = await queue.claim(KEYS, max_items=1, lease_ms=1000, worker_id="w")
    assert await queue.ack(KEYS, batch.token + 1, ["a"]) == 0
    assert await queue.ack(KEYS, batch.token, ["a"]) == 1
    assert await redis.zcard(KEYS.inflight) == 0
    assert not await redis.exists(KEYS.job("a"))


async def test_a_reclaimed_lease_can_neither_ack_nor_extend(queue: QueueProtocol, redis: Redis) -> None:
    await put(queue, "a")
    first = await queue.claim(KEYS, max_items=1, lease_ms=0, worker_id="slow")
    reaped = await queue.reap(KEYS, max_attempts=3)
    assert reaped.requeued == 1
    second = await queue.claim(KEYS, max_items=1, lease_ms=60_000, worker_id="fast")
    assert [job_id for job_id, _ in second.jobs] == ["a"]
    assert second.token != first.token
    assert await queue.extend(KEYS, first.token, ["a"], lease_ms=60_000) == 0
    assert await queue.ack(KEYS, first.token, ["a"]) == 0
    assert await redis.hget(KEYS.job("a"), "w") == b"fast"
    assert await queue.ack(KEYS, second.token, ["a"]) == 1


async def test_reaped_jobs_return_to_the_head_with_their_deadline(queue: QueueProtocol, redis: Redis) -> None:
    await put(queue, "old", deadline_ms=FAR_MS - 5)
    await put(queue, "new")
    await queue.claim(KEYS, max_items=1, lease_ms=0, worker_id="dead")
    assert (await queue.reap(KEYS, max_attempts=3)).requeued == 1
    batch = await queue.claim(KEYS, max_items=1, lease_ms=1000, worker_id="w")
    assert [job_id for job_id, _ in batch.jobs] == ["old"]
    assert await redis.hget(KEYS.job("old"), "d") == str(FAR_MS - 5).encode()
    assert await redis.hget(KEYS.job("old"), "a") == b"2"


async def test_a_live_lease_is_not_reaped_and_extend_keeps_it(queue: QueueProtocol, redis: Redis) -> None:
    await put(queue, "a")
    batch = await queue.claim(KEYS, max_items=1, lease_ms=0, worker_id="w")
    assert await queue.extend(KEYS, batch.token, ["a"], lease_ms=60_000) == 1
    assert (await queue.reap(KEYS, max_attempts=3)).requeued == 0
    assert await redis.zcard(KEYS.inflight) == 1


async def test_poison_job_is_dead_lettered_after_max_attempts(queue: QueueProtocol, redis: Redis) -> None:
    await put(queue, "poison")
    for attempt in (1, 2):
        batch = await queue.claim(KEYS, max_items=1, lease_ms=0, worker_id=f"w{attempt}")
        assert [job_id for job_id, _ in batch.jobs] == ["poison"]
        reaped = await queue.reap(KEYS, max_attempts=3)
        assert (reaped.requeued, reaped.dead) == (1, [])
    await queue.claim(KEYS, max_items=1, lease_ms=0, worker_id="w3")
    reaped = await queue.reap(KEYS, max_attempts=3)
    assert reaped.requeued == 0
    assert reaped.dead == [("poison", "replies", 3)]
    assert await redis.keys("*job*") == []
    assert await redis.zcard(KEYS.ready) == 0
    assert await redis.zcard(KEYS.inflight) == 0


async def test_release_puts_untouched_jobs_back_without_counting_an_attempt(queue: QueueProtocol, redis: Redis) -> None:
    await put(queue, "a")
    await put(queue, "b")
    batch = await queue.claim(KEYS, max_items=2, lease_ms=60_000, worker_id="stopping")
    assert await queue.release(KEYS, batch.token, ["a", "b"]) == 2
    assert [m.decode() for m in await redis.zrange(KEYS.ready, 0, -1)] == ["a", "b"]
    assert await redis.hget(KEYS.job("a"), "a") == b"0"
    assert await redis.zcard(KEYS.inflight) == 0
    assert await redis.llen(KEYS.wake) == 1


async def test_scripts_survive_a_script_flush(queue: QueueProtocol, redis: Redis) -> None:
    await put(queue, "a")
    await redis.script_flush()  # what a restarted or failed-over Redis looks like to a client
    assert await put(queue, "b") == 1
    batch = await queue.claim(KEYS, max_items=2, lease_ms=1000, worker_id="w")
    assert [job_id for job_id, _ in batch.jobs] == ["a", "b"]


async def test_withdraw_removes_only_jobs_no_worker_holds(queue: QueueProtocol, redis: Redis) -> None:
    await put(queue, "abandoned")
    await put(queue, "running")
    batch = await queue.claim(KEYS, max_items=1, lease_ms=60_000, worker_id="w", signature="")
    assert [job_id for job_id, _ in batch.jobs] == ["abandoned"]
    # the leased one stays (its worker answers it); the queued one goes
    assert await queue.withdraw(KEYS, "abandoned") is False
    assert await queue.withdraw(KEYS, "running") is True
    assert await redis.zcard(KEYS.ready) == 0
    assert not await redis.exists(KEYS.job("running"))
    assert await redis.exists(KEYS.job("abandoned"))


async def put_for(
    queue: QueueProtocol, job_id: str, tenant: str, *, weight: float = 1.0, tier: int = 1, max_queued: int = 0
) -> int:
    enqueued = await queue.enqueue(
        KEYS,
        job_id,
        tier=tier,
        payload=b"x",
        deadline_ms=FAR_MS,
        tenant=tenant,
        reply_to="replies",
        signature="4",
        max_queue_size=0,
        weight=weight,
        tenant_max_queued=max_queued,
    )
    return enqueued.code


async def claim_one(queue: QueueProtocol, every: int = 0) -> str:
    batch = await queue.claim(KEYS, max_items=1, lease_ms=60_000, worker_id="w", lower_share_every=every)
    [(job_id, _)] = batch.jobs
    return job_id


async def test_tenants_share_a_tier_by_weight_not_by_arrival(queue: QueueProtocol) -> None:
    # The heavy tenant queues 300 requests before the light one queues any.
    for i in range(300):
        await put_for(queue, f"flood-{i}", "flood", weight=1)
    for i in range(300):
        await put_for(queue, f"steady-{i}", "steady", weight=3)
    served = [await claim_one(queue) for _ in range(200)]
    flood = sum(job_id.startswith("flood") for job_id in served)
    steady = len(served) - flood
    assert steady / flood == pytest.approx(3, rel=0.1)  # 1:3 by weight, within 10%


async def test_a_late_tenant_is_not_stuck_behind_an_early_flood(queue: QueueProtocol) -> None:
    for i in range(1000):
        await put_for(queue, f"flood-{i}", "flood")
    for _ in range(100):  # the flood has been served for a while
        await claim_one(queue)
    await put_for(queue, "newcomer-0", "newcomer")
    # it starts at the tier's virtual clock, not behind the flood's 900 queued jobs
    assert "newcomer-0" in [await claim_one(queue) for _ in range(2)]


async def test_lower_tiers_get_a_bounded_share_while_higher_tiers_have_work(queue: QueueProtocol) -> None:
    for i in range(100):
        await put_for(queue, f"top-{i}", "t", tier=0)
    for i in range(5):
        await put_for(queue, f"middle-{i}", "t", tier=1)
        await put_for(queue, f"bottom-{i}", "t", tier=2)
    served = [await claim_one(queue, every=5) for _ in range(50)]
    tiers = [job_id.split("-")[0] for job_id in served]
    assert tiers.count("top") == 40  # 4 of every 5 claims
    assert tiers.count("middle") == 5  # the two lower tiers take turns with the rest
    assert tiers.count("bottom") == 5
    assert [await claim_one(queue) for _ in range(3)] == ["top-40", "top-41", "top-42"]  # share off: strict


async def test_max_queued_counts_a_tenants_waiting_jobs_exactly(queue: QueueProtocol, redis: Redis) -> None:
    assert [await put_for(queue, f"a-{i}", "a", max_queued=2) for i in range(3)] == [1, 1, -2]
    assert await put_for(queue, "b-0", "b", max_queued=2) == 1  # another tenant is not affected
    assert not await redis.exists(KEYS.job("a-2"))  # the refusal wrote nothing
    taken = await queue.claim(KEYS, max_items=1, lease_ms=0, worker_id="w")  # a-0 leaves the queue...
    assert await put_for(queue, "a-3", "a", max_queued=2) == 1  # ...so a has room again
    assert await redis.hget(KEYS.queued, "a") == b"2"
    assert (await queue.reap(KEYS, max_attempts=3)).requeued == 1  # a-0 back in the queue: counted
    assert await redis.hget(KEYS.queued, "a") == b"3"
    assert await queue.withdraw(KEYS, "a-3") is True
    assert await redis.hget(KEYS.queued, "a") == b"2"
    assert taken.token > 0
    while (await queue.claim(KEYS, max_items=8, lease_ms=1000, worker_id="w")).jobs:
        pass
    assert await redis.exists(KEYS.queued) == 0  # drained: no counts left behind


async def test_a_job_due_before_the_batch_could_finish_is_expired_not_taken(queue: QueueProtocol) -> None:
    now_ms = int(time.time() * 1000)
    await put(queue, "soon", deadline_ms=now_ms + 30_000)  # due in 30 s
    await put(queue, "later", deadline_ms=now_ms + 120_000)
    # A batch expected to take 60 s cannot finish "soon" in time: answered, never computed.
    batch = await queue.claim(KEYS, max_items=8, lease_ms=60_000, worker_id="w", batch_ms=60_000)
    assert [job_id for job_id, _ in batch.jobs] == ["later"]
    assert [job_id for job_id, _ in batch.expired] == ["soon"]


async def test_a_stale_estimate_still_tries_one_job_that_has_not_passed_its_deadline(queue: QueueProtocol) -> None:
    # One 32 s batch once: the estimate says no 30 s job can finish. Without a batch
    # that runs, the estimate would never come down (issue 16, seen 3): one is tried.
    now_ms = int(time.time() * 1000)
    await put(queue, "first", deadline_ms=now_ms + 30_000)
    await put(queue, "second", deadline_ms=now_ms + 30_000)
    await put(queue, "gone", deadline_ms=now_ms - 1)
    batch = await queue.claim(KEYS, max_items=8, lease_ms=60_000, worker_id="w", batch_ms=32_000)
    assert [job_id for job_id, _ in batch.jobs] == ["first"]
    assert sorted(job_id for job_id, _ in batch.expired) == ["gone", "second"]


async def test_a_fast_batch_takes_a_job_close_to_its_deadline(queue: QueueProtocol) -> None:
    await put(queue, "soon", deadline_ms=int(time.time() * 1000) + 30_000)
    batch = await queue.claim(KEYS, max_items=8, lease_ms=60_000, worker_id="w", batch_ms=5)
    assert [job_id for job_id, _ in batch.jobs] == ["soon"]
    assert batch.expired == []


# ------------------------------------------------------------ shedding by deadline


async def redis_now_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return seconds * 1000 + micros // 1000


async def record_drain(queue: QueueProtocol, ms_per_job: float, worker_id: str = "w") -> None:
    """A claim by a worker that takes ``ms_per_job`` per job (it takes a seed job)."""
    await put(queue, f"seed-{worker_id}")
    await queue.claim(KEYS, max_items=1, lease_ms=60_000, worker_id=worker_id, ms_per_job=ms_per_job)


async def test_a_request_that_would_wait_past_its_deadline_is_refused_at_once(
    queue: QueueProtocol, redis: Redis
) -> None:
    await record_drain(queue, ms_per_job=100)  # 10 jobs/s
    deadline_ms = await redis_now_ms(redis) + 250
    assert await put(queue, "first", deadline_ms=deadline_ms) == 1  # nothing ahead: always tried
    assert await put(queue, "second", deadline_ms=deadline_ms) == 1  # 1 ahead: about 200 ms
    third = await queue.enqueue(
        KEYS, "third", tier=1, payload=b"x", deadline_ms=deadline_ms, tenant="t", reply_to="r",
        signature="4", max_queue_size=0,
    )  # fmt: skip
    assert (third.code, third.wait_ms) == (-3, 300)  # 2 ahead, then itself, at 100 ms each
    assert not await redis.exists(KEYS.job("third"))  # refused before anything was written
    assert await redis.zcard(KEYS.ready) == 2
    # A second worker on the model doubles the drain rate: the same request fits now.
    await record_drain(queue, ms_per_job=100, worker_id="w2")
    assert await put(queue, "third", deadline_ms=deadline_ms) == 1


async def test_a_flooding_tenant_is_shed_while_its_neighbour_is_admitted(queue: QueueProtocol, redis: Redis) -> None:
    await record_drain(queue, ms_per_job=10)  # 100 jobs/s
    for i in range(50):  # half a second of the flood's own backlog
        await put_for(queue, f"flood-{i}", "flood")
    soon_ms = await redis_now_ms(redis) + 200

    async def offer(job_id: str, tenant: str) -> int:
        enqueued = await queue.enqueue(
            KEYS, job_id, tier=1, payload=b"x", deadline_ms=soon_ms, tenant=tenant, reply_to="r", signature="4",
            max_queue_size=0,
        )  # fmt: skip
        return enqueued.code

    assert await offer("flood-late", "flood") == -3  # behind its own 50 jobs in virtual time
    assert await offer("steady-1", "steady") == 1  # starts at the tier's clock: little ahead


async def test_no_fresh_drain_figure_means_no_shedding(queue: QueueProtocol, redis: Redis) -> None:
    for i in range(20):
        await put(queue, f"j{i}")
    deadline_ms = await redis_now_ms(redis) + 50
    assert await put(queue, "unknown-rate", deadline_ms=deadline_ms) == 1  # no worker has said how fast
    stale_ms = await redis_now_ms(redis) - 60_000
    await redis.hset(KEYS.drain, "gone", f"1000 {stale_ms}")  # a worker that stopped a minute ago
    assert await put(queue, "stale-rate", deadline_ms=deadline_ms) == 1


async def commands_per_job(queue: QueueProtocol, redis: Redis, *, tenants: int, depth: int, jobs: int = 30) -> float:
    """Redis commands, those the scripts run included, per enqueue, claim and ack of
    one job, with ``depth`` jobs of ``tenants`` tenants waiting all along."""
    for i in range(depth):
        await put_for(queue, f"backlog-{i}", f"tenant-{i % tenants}", max_queued=10**6)
    before = await snapshot(redis)
    for i in range(jobs):
        await put_for(queue, f"job-{i}", f"tenant-{i % tenants}", max_queued=10**6)
        batch = await queue.claim(
            KEYS, max_items=1, lease_ms=60_000, worker_id="w", ms_per_job=1.0, lower_share_every=4
        )
        [(job_id, _)] = batch.jobs
        assert await queue.ack(KEYS, batch.token, [job_id]) == 1
    return (await snapshot(redis)).usage_since(before).commands / jobs


async def test_redis_commands_per_job_do_not_grow_with_queue_depth_or_tenants(
    queue: QueueProtocol, redis: Redis
) -> None:
    """The README's scale figure: every script touches a bounded number of keys,
    so a job costs Redis the same work behind 20 jobs of one tenant as behind
    2 000 jobs of 200 tenants, within a couple of conditional writes (a tier's
    clock moves on fewer claims when many tenants share a virtual start)."""
    shallow = await commands_per_job(queue, redis, tenants=1, depth=20)
    await redis.flushdb()
    deep = await commands_per_job(queue, redis, tenants=200, depth=2_000)
    assert 10 < shallow < 60
    assert abs(deep - shallow) <= 2


# ------------------------------------------------------------ replies, depth, waking


async def test_replies_are_pushed_with_an_expiry_and_popped_in_order(
    queue: QueueProtocol, link: RedisLink, redis: Redis, redis_url: str
) -> None:
    replies = reply_key("g1")
    commands = push_commands({replies: [b"reply-a", b"reply-b"]})
    assert [c[0] for c in commands] == ["RPUSH", "EXPIRE"]
    assert (await link.pipeline(commands))[0] == 2
    assert 0 < await redis.ttl(replies) <= REPLY_TTL_S  # a dead gateway's list goes away
    blocking = RedisLink(redis_url, command_timeout_s=None)
    try:
        assert await pop_replies(blocking, replies, wait_s=1, max_count=1) == [b"reply-a"]
        assert await pop_replies_now(blocking, replies, max_count=8) == [b"reply-b"]
        assert await pop_replies_now(blocking, replies, max_count=8) == []
    finally:
        await blocking.aclose()


async def test_depth_counts_each_tier_by_name(queue: QueueProtocol, redis_url: str) -> None:
    for job_id, tier in [("r", 0), ("b1", 2), ("b2", 2)]:
        await put(queue, job_id, tier=tier)
    client = SyncRedis.from_url(redis_url)
    try:
        depths = queue_depths(client, [("m", 1), ("other", 1)])
    finally:
        client.close()
    assert depths == {("m", 1): {"realtime": 1, "standard": 0, "batch": 2}, ("other", 1): dict.fromkeys(TIER_NAMES, 0)}


async def test_a_job_scores_inside_its_tier_span(queue: QueueProtocol, redis: Redis) -> None:
    for tier in range(len(TIER_NAMES)):
        await put(queue, f"t{tier}", tier=tier)
    scores = dict(await redis.zrange(KEYS.ready, 0, -1, withscores=True))
    assert {job.decode(): int(score) // TIER_SPAN for job, score in scores.items()} == {"t0": 0, "t1": 1, "t2": 2}


async def test_a_wait_takes_the_token_of_the_list_that_woke_it(
    queue: QueueProtocol, redis: Redis, redis_url: str
) -> None:
    await queue.wake_worker("w1")
    blocking = RedisLink(redis_url, command_timeout_s=None)
    try:
        popped = await blocking.execute(*wait_command([KEYS.wake, worker_wake_key("w1")], 1))
        assert woken_key(popped) == worker_wake_key("w1")
        await put(queue, "a")  # enqueue leaves a token on the model's wake list
        assert woken_key(await blocking.execute(*wait_command([KEYS.wake], 1))) == KEYS.wake
        assert woken_key(await blocking.execute(*wait_command([KEYS.wake], 0.01))) is None
    finally:
        await blocking.aclose()
    await queue.wake_worker("w1")
    await queue.forget_worker("w1")
    assert not await redis.exists(worker_wake_key("w1"))
    assert (await queue.held([(KEYS, "a"), (KEYS, "gone")])) == [True, False]
