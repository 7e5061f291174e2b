"""What one call costs Redis, pinned by count (commands are exact, unlike CPU), and the
guarantees the cheaper scripts keep: a reply and its ack in one script, fencing, the
reply list's expiry, and the idle reset done by the sweep instead of every ack."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from meshserve.queue import (
    REPLY_TTL_S,
    Enqueued,
    ModelKeys,
    QueueProtocol,
    pop_replies,
    reply_ack_command,
    reply_ack_commands,
    reply_ack_result,
    reply_key,
    wait_command,
    woken_key,
)
from meshserve.queue.protocol import KEY_PAYLOAD_BYTES, LUA_PAYLOAD_BYTES
from meshserve.store.link import Chunks, RedisLink
from meshserve_bench.redis_cost import per_call, snapshot

KEYS = ModelKeys.for_model("m", 1)
FAR_MS = 10**13
REPLIES = reply_key("g1")

ONE_CALL = Counter(
    {
        "blpop": 1,  # the worker's wake-up
        "blmpop": 1,  # the gateway's reply reader
        # ENQUEUE on an empty queue
        "evalsha": 3,
        "zcard": 1,
        "hexists": 1,
        "hmget": 3,  # enqueue's scheduler read; claim's scheduler read and its job read
        "hset": 5,  # enqueue: the tenant's finish, the job; claim: drain, the lease, the scheduler
        "pexpireat": 1,
        "zadd": 2,
        "hincrby": 1,
        "rpush": 2,  # the wake token, the reply
        # CLAIM
        "time": 1,
        "zrange": 1,
        "incr": 1,
        "zrem": 2,
        "del": 2,  # the tenants' counts (the queue emptied), the job at its ack
        # REPLY_ACK
        "expire": 1,
        "hget": 1,
    }
)
"""Commands of one call on an idle model, by name, scripts' own included: every
command of the request path (docs/performance.md has the table)."""


@pytest.fixture
def queue(link: RedisLink) -> QueueProtocol:
    return QueueProtocol(link)


async def enqueue(queue: QueueProtocol, job_id: str, tenant: str = "t") -> int:
    enqueued = await queue.enqueue(
        KEYS,
        job_id,
        tier=1,
        payload=f"payload-{job_id}".encode(),
        deadline_ms=FAR_MS,
        tenant=tenant,
        reply_to=REPLIES,
        signature="4",
        max_queue_size=100,
    )
    return enqueued.code


async def claim(queue: QueueProtocol, max_items: int = 1) -> tuple[int, list[str]]:
    batch = await queue.claim(
        KEYS, max_items=max_items, lease_ms=60_000, worker_id="w", ms_per_job=1.0, lower_share_every=4
    )
    return batch.token, [job_id for job_id, _ in batch.jobs]


async def test_one_call_on_an_idle_model_costs_these_commands(
    queue: QueueProtocol, link: RedisLink, redis: Redis
) -> None:
    async def one_call(job_id: str) -> int:
        assert await enqueue(queue, job_id) == 1
        assert woken_key(await link.execute(*wait_command([KEYS.wake], 1))) == KEYS.wake  # the worker wakes
        token, [claimed] = await claim(queue)
        [acked] = await link.pipeline([reply_ack_command(KEYS, REPLIES, [b"reply"], [(token, claimed)])])
        assert await pop_replies(link, REPLIES, wait_s=1, max_count=8) == [b"reply"]  # the gateway's reader
        return int(acked)

    await queue.load_ack_script()
    assert await one_call("warm-up") == 1  # Redis loads each script once
    await queue.reap(KEYS, max_attempts=3)  # idle again, as after the sweep
    before = await snapshot(redis)
    assert await one_call("a") == 1
    usage = (await snapshot(redis)).usage_since(before)
    assert Counter(usage.by_command) == ONE_CALL
    assert usage.commands == sum(ONE_CALL.values()) == 30
    assert per_call(usage, calls=1)["redis_round_trips_per_call"] == 5


async def test_a_batch_shares_its_claim_and_reply_commands(queue: QueueProtocol, link: RedisLink, redis: Redis) -> None:
    await queue.load_ack_script()
    for i in range(8):
        assert await enqueue(queue, f"j{i}", tenant=f"t{i % 2}") == 1
    before = await snapshot(redis)
    token, ids = await claim(queue, max_items=8)
    [acked] = await link.pipeline([reply_ack_command(KEYS, REPLIES, [b"r"] * 8, [(token, i) for i in ids])])
    usage = (await snapshot(redis)).usage_since(before)
    assert acked == 8
    # per job: its HMGET and lease HSET in the claim, its HGET (fencing) in the ack
    assert usage.by_command["hmget"] == 8 + 1
    assert usage.by_command["hget"] == 8
    assert (usage.by_command["zrem"], usage.by_command["zadd"], usage.by_command["del"]) == (2, 1, 2)
    assert usage.commands <= 2 + 3 * 8 + 16  # the scripts' fixed part, and three per job


async def test_reply_and_ack_go_together_and_a_stale_token_acks_nothing(
    queue: QueueProtocol, link: RedisLink, redis: Redis
) -> None:
    await queue.load_ack_script()
    assert await enqueue(queue, "a") == 1
    token, [job_id] = await claim(queue)
    stale = reply_ack_command(KEYS, REPLIES, [b"late"], [(token - 1, job_id)])
    assert await link.pipeline([stale]) == [0]  # its reply is written (the gateway drops a late one)
    assert await redis.exists(KEYS.job(job_id)) == 1  # but the lease holder's job stays
    fresh = reply_ack_command(KEYS, REPLIES, [b"reply"], [(token, job_id)])
    assert await link.pipeline([fresh]) == [1]
    assert await redis.exists(KEYS.job(job_id)) == 0
    assert await redis.zcard(KEYS.inflight) == 0
    assert await redis.lrange(REPLIES, 0, -1) == [b"late", b"reply"]


async def test_the_reply_list_expiry_is_set_by_the_push_that_creates_it(link: RedisLink, redis: Redis) -> None:
    await link.pipeline([reply_ack_command(KEYS, REPLIES, [b"first"], [])])
    assert 0 < await redis.ttl(REPLIES) <= REPLY_TTL_S
    await redis.expire(REPLIES, 1000)  # a later push finds the list, and leaves its expiry alone
    await link.pipeline([reply_ack_command(KEYS, REPLIES, [b"second"], [])])
    assert REPLY_TTL_S < await redis.ttl(REPLIES) <= 1000


async def test_an_idle_model_is_reset_by_the_sweep_not_by_the_ack(
    queue: QueueProtocol, link: RedisLink, redis: Redis
) -> None:
    await queue.load_ack_script()
    assert await enqueue(queue, "a") == 1
    token, [job_id] = await claim(queue)
    await link.pipeline([reply_ack_command(KEYS, REPLIES, [b"reply"], [(token, job_id)])])
    assert await redis.exists(KEYS.sched, KEYS.drain) == 2  # the ack left them: the next call reuses them
    reaped = await queue.reap(KEYS, max_attempts=3)
    assert (reaped.requeued, reaped.dead) == (0, [])
    assert await redis.exists(KEYS.sched, KEYS.queued) == 0  # idle: virtual time restarts at 0
    assert await redis.exists(KEYS.drain) == 1  # a fresh drain figure stays: a burst after a pause is shed
    seconds, micros = await redis.time()
    stale_ms = seconds * 1000 + micros // 1000 - 60_000
    await redis.hset(KEYS.drain, "w", f"1.0000 {stale_ms}")  # the worker last claimed a minute ago
    await queue.reap(KEYS, max_attempts=3)
    assert await redis.exists(KEYS.drain) == 0  # an idle model leaves no keys


async def test_the_sweep_leaves_a_busy_model_alone(queue: QueueProtocol, redis: Redis) -> None:
    assert await enqueue(queue, "a") == 1
    assert await enqueue(queue, "b") == 1
    await claim(queue)
    await queue.reap(KEYS, max_attempts=3)
    assert await redis.exists(KEYS.sched, KEYS.queued) == 2
    assert await redis.hget(KEYS.queued, "t") == b"1"  # b is still queued


async def test_an_enqueue_on_an_empty_queue_leaves_one_wake_token_at_most(queue: QueueProtocol, redis: Redis) -> None:
    await redis.rpush(KEYS.wake, 1)  # a token a claim left for work another claim then took
    assert await enqueue(queue, "a") == 1
    assert await redis.llen(KEYS.wake) == 1
    assert await enqueue(queue, "b") == 1  # work queued: a token is there, none added
    assert await redis.llen(KEYS.wake) == 1


async def test_a_large_payload_rides_beside_the_script_in_one_round_trip_and_a_refused_one_queues_nothing(
    queue: QueueProtocol, redis: Redis
) -> None:
    payload = Chunks.of([b"\x00head", bytes(LUA_PAYLOAD_BYTES)])
    common: dict[str, Any] = {"tier": 1, "deadline_ms": FAR_MS, "tenant": "t", "reply_to": REPLIES}
    before = await snapshot(redis)
    enqueued = await queue.enqueue(KEYS, "big", payload=payload, signature="4", max_queue_size=0, **common)
    usage = (await snapshot(redis)).usage_since(before)
    assert enqueued.code == Enqueued.ENQUEUED
    assert await redis.hstrlen(KEYS.job("big"), "b") == payload.nbytes
    assert (usage.by_command["multi"], usage.by_command["exec"], usage.by_command["evalsha"]) == (1, 1, 1)
    await redis.config_set("maxmemory", 1)  # every write refused: the payload's transaction is discarded
    try:
        with pytest.raises(ResponseError, match="OOM"):
            await queue.enqueue(KEYS, "refused", payload=payload, signature="4", max_queue_size=0, **common)
    finally:
        await redis.config_set("maxmemory", 0)
    assert not await redis.exists(KEYS.job("refused"))
    assert [m.decode() for m in await redis.zrange(KEYS.ready, 0, -1)] == ["big"]


async def test_a_large_reply_rides_beside_the_reply_script_atomically_and_a_refused_one_acks_nothing(
    queue: QueueProtocol, link: RedisLink, redis: Redis
) -> None:
    """Lua would copy a large reply into its heap and out again: it goes in a
    transaction beside the script, which still acks only once everything is in."""
    await queue.load_ack_script()
    for job_id in ("a", "b", "c"):
        assert await enqueue(queue, job_id) == 1
    token, [a, b, c] = await claim(queue, max_items=3)
    large = Chunks.of([b"\x00head", bytes(LUA_PAYLOAD_BYTES)])
    await redis.config_set("maxmemory", 1)  # every write refused: nothing is pushed, nothing acked
    try:
        refused = await link.pipeline(reply_ack_commands(KEYS, REPLIES, [large, b"small"], [(token, a), (token, b)]))
    finally:
        await redis.config_set("maxmemory", 0)
    assert isinstance(reply_ack_result(refused), ResponseError)
    assert "OOM" in str(reply_ack_result(refused))
    assert await redis.exists(REPLIES) == 0
    assert await redis.zcard(KEYS.inflight) == 3
    before = await snapshot(redis)
    commands = reply_ack_commands(KEYS, REPLIES, [large, b"small"], [(token, a), (token, b)])
    assert reply_ack_result(await link.pipeline(commands)) == 2
    usage = (await snapshot(redis)).usage_since(before)
    assert (usage.by_command["multi"], usage.by_command["exec"], usage.by_command["rpush"]) == (1, 1, 2)
    only_large = reply_ack_commands(KEYS, REPLIES, [large], [(token, c)])  # the script pushes nothing itself
    assert reply_ack_result(await link.pipeline(only_large)) == 1
    replies = await redis.lrange(REPLIES, 0, -1)
    assert [len(reply) for reply in replies] == [large.nbytes, len(b"small"), large.nbytes]
    assert replies[0] == b"\x00head" + bytes(LUA_PAYLOAD_BYTES)
    assert 0 < await redis.ttl(REPLIES) <= REPLY_TTL_S
    assert await redis.zcard(KEYS.inflight) == 0
    assert await redis.exists(KEYS.job(a), KEYS.job(b), KEYS.job(c)) == 0


def test_small_replies_keep_the_one_script_command() -> None:
    assert reply_ack_commands(KEYS, REPLIES, [b"r"], [(1, "a")]) == [
        reply_ack_command(KEYS, REPLIES, [b"r"], [(1, "a")])
    ]


async def test_a_call_whose_payload_has_its_own_key_costs_three_commands_more(
    queue: QueueProtocol, link: RedisLink, redis: Redis
) -> None:
    """A payload over KEY_PAYLOAD_BYTES, where every worker reads payload keys: one SET
    beside ENQUEUE (in its round trip), the script's EXISTS of it, and the worker's
    MGET after the claim (one round trip more); the payload never enters Lua."""
    body = Chunks.of([b"\x00head", bytes(3 * KEY_PAYLOAD_BYTES)])

    async def one_call(job_id: str) -> int:
        enqueued = await queue.enqueue(
            KEYS,
            job_id,
            tier=1,
            payload=body,
            deadline_ms=FAR_MS,
            tenant="t",
            reply_to=REPLIES,
            signature="4",
            max_queue_size=100,
            payload_key=True,
        )
        assert enqueued.code == Enqueued.ENQUEUED
        assert woken_key(await link.execute(*wait_command([KEYS.wake], 1))) == KEYS.wake
        batch = await queue.fetch_bulk(
            KEYS,
            await queue.claim(KEYS, max_items=1, lease_ms=60_000, worker_id="w", ms_per_job=1.0, lower_share_every=4),
        )
        [(claimed, read)] = batch.jobs
        assert len(read) == body.nbytes
        [acked] = await link.pipeline([reply_ack_command(KEYS, REPLIES, [b"reply"], [(batch.token, claimed)])])
        assert await pop_replies(link, REPLIES, wait_s=1, max_count=8) == [b"reply"]
        return int(acked)

    await queue.load_ack_script()
    assert await one_call("warm-up") == 1
    await queue.reap(KEYS, max_attempts=3)
    before = await snapshot(redis)
    assert await one_call("a") == 1
    usage = (await snapshot(redis)).usage_since(before)
    assert Counter(usage.by_command) == ONE_CALL + Counter({"set": 1, "exists": 1, "mget": 1})
    assert await redis.keys("*:p") == []
