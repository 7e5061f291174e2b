"""Payloads in keys of their own (``<job key>:p``): written with one SET beside
ENQUEUE, read with one MGET after CLAIM, deleted with their job on every path, and
used only while every live worker reads them (``RoutingTable.payload_keys``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from meshserve.devkit.examples import write_example_repository
from meshserve.models.repository import load_model
from meshserve.queue import Enqueued, ModelKeys, QueueProtocol, reply_ack_command
from meshserve.queue.protocol import KEY_PAYLOAD_BYTES, LUA_PAYLOAD_BYTES
from meshserve.store.link import Chunks, RedisLink
from router.core import RouterCore
from tests.support import infer_request, infer_stub, output_arrays, queue_leftovers, start_mesh, stop_mesh

KEYS = ModelKeys.for_model("m", 1)
RPC_TIMEOUT_S = 30


def payload(tag: int, size: int = 3 * KEY_PAYLOAD_BYTES) -> Chunks:
    return Chunks.of([b"\x00head", np.full(size, tag, dtype=np.uint8)])


def wire(chunks: Chunks) -> bytes:
    return b"".join(bytes(part) for part in chunks.buffers)


@pytest.fixture
def queue(link: RedisLink) -> QueueProtocol:
    return QueueProtocol(link)


async def enqueue(queue: QueueProtocol, job_id: str, body: Chunks, *, max_queue_size: int = 0, **more: Any) -> int:
    options: dict[str, Any] = {"deadline_ms": int(time.time() * 1000) + 60_000, **more}
    enqueued = await queue.enqueue(
        KEYS,
        job_id,
        tier=1,
        payload=body,
        tenant="t",
        reply_to="replies",
        signature="",
        max_queue_size=max_queue_size,
        payload_key=True,
        **options,
    )
    return enqueued.code


async def claim(queue: QueueProtocol, max_items: int = 8, batch_ms: int = 0) -> Any:
    return await queue.fetch_bulk(
        KEYS, await queue.claim(KEYS, max_items=max_items, lease_ms=60_000, worker_id="w", batch_ms=batch_ms)
    )


async def test_a_payload_goes_into_its_own_key_with_the_jobs_expiry_and_is_read_with_the_batch(
    queue: QueueProtocol, redis: Redis
) -> None:
    deadline_ms = int(time.time() * 1000) + 60_000
    bodies = {f"j{i}": payload(i) for i in range(3)}
    for job_id, body in bodies.items():
        assert await enqueue(queue, job_id, body, deadline_ms=deadline_ms) == Enqueued.ENQUEUED
    assert await redis.strlen(KEYS.payload("j0")) == bodies["j0"].nbytes
    assert await redis.hget(KEYS.job("j0"), "p") == b""  # nothing through Lua
    assert abs(await redis.pexpiretime(KEYS.payload("j0")) - await redis.pexpiretime(KEYS.job("j0"))) <= 1
    batch = await claim(queue)
    assert {job_id: body for job_id, body in batch.jobs} == {job_id: wire(body) for job_id, body in bodies.items()}


async def test_a_small_payload_still_goes_through_the_script(queue: QueueProtocol, redis: Redis) -> None:
    small = payload(1, KEY_PAYLOAD_BYTES // 2)
    assert await enqueue(queue, "s", small) == Enqueued.ENQUEUED
    assert not await redis.exists(KEYS.payload("s"))
    assert await redis.hget(KEYS.job("s"), "p") == wire(small)


async def test_the_payload_key_goes_with_its_job_on_every_path(
    queue: QueueProtocol, link: RedisLink, redis: Redis
) -> None:
    # answered: REPLY_ACK deletes it
    assert await enqueue(queue, "answered", payload(1)) == Enqueued.ENQUEUED
    batch = await claim(queue)
    await queue.load_ack_script()
    [acked] = await link.pipeline([reply_ack_command(KEYS, "replies", [b"r"], [(batch.token, "answered")])])
    assert acked == 1
    # acked without a reply (ACK)
    assert await enqueue(queue, "acked", payload(2)) == Enqueued.ENQUEUED
    batch = await claim(queue)
    assert await queue.ack(KEYS, batch.token, ["acked"]) == 1
    # withdrawn before a claim
    assert await enqueue(queue, "withdrawn", payload(3)) == Enqueued.ENQUEUED
    assert await queue.withdraw(KEYS, "withdrawn")
    # expired at the claim (its deadline comes before the batch could finish)
    soon_ms = int(time.time() * 1000) + 1_000
    assert await enqueue(queue, "late", payload(4), deadline_ms=soon_ms) == Enqueued.ENQUEUED
    assert await enqueue(queue, "ontime", payload(5)) == Enqueued.ENQUEUED
    batch = await claim(queue, batch_ms=10_000)
    assert [job_id for job_id, _ in batch.jobs] == ["ontime"]
    assert [j for j, _ in batch.expired] == ["late"]
    assert await queue.ack(KEYS, batch.token, ["ontime"]) == 1
    # dead after its last attempt: the sweep removes it
    assert await enqueue(queue, "poison", payload(6)) == Enqueued.ENQUEUED
    await queue.claim(KEYS, max_items=1, lease_ms=1, worker_id="w")
    await wait_until_reaped(queue)
    assert await queue_leftovers(redis) == []


async def wait_until_reaped(queue: QueueProtocol) -> None:
    deadline_s = time.monotonic() + 10
    while time.monotonic() < deadline_s:
        if (await queue.reap(KEYS, max_attempts=1)).dead:
            return
    raise AssertionError("the lease never lapsed")


async def test_a_requeued_job_keeps_its_payload(queue: QueueProtocol) -> None:
    body = payload(7)
    assert await enqueue(queue, "again", body) == Enqueued.ENQUEUED
    await queue.claim(KEYS, max_items=1, lease_ms=1, worker_id="w")
    deadline_s = time.monotonic() + 10
    while (await queue.reap(KEYS, max_attempts=3)).requeued == 0:
        assert time.monotonic() < deadline_s, "the lease never lapsed"
    assert (await claim(queue)).jobs == [("again", wire(body))]


async def test_a_duplicate_keeps_the_first_payload_and_a_refusal_leaves_nothing(
    queue: QueueProtocol, redis: Redis
) -> None:
    first, other = payload(1), payload(2)
    assert await enqueue(queue, "a", first) == Enqueued.ENQUEUED
    assert await enqueue(queue, "a", other) == Enqueued.DUPLICATE
    assert await enqueue(queue, "a", other, max_queue_size=1) == Enqueued.MODEL_QUEUE_FULL  # a retry, refused
    assert await redis.get(KEYS.payload("a")) == wire(first)
    assert await enqueue(queue, "b", other, max_queue_size=1) == Enqueued.MODEL_QUEUE_FULL
    assert not await redis.exists(KEYS.payload("b"), KEYS.job("b"))
    await redis.config_set("maxmemory", 1)  # every write refused: the SET too, and nothing is queued
    try:
        with pytest.raises(ResponseError, match="OOM"):
            await enqueue(queue, "c", other)
    finally:
        await redis.config_set("maxmemory", 0)
    assert not await redis.exists(KEYS.payload("c"), KEYS.job("c"))
    assert [m.decode() for m in await redis.zrange(KEYS.ready, 0, -1)] == ["a"]


async def test_a_worker_reads_jobs_an_older_gateway_wrote_beside_it(queue: QueueProtocol, redis: Redis) -> None:
    """A gateway that does not write payload keys (older, or told not to) writes
    small payloads through the script and large ones into the hash's field ``b``;
    one batch may hold all three forms."""
    common: dict[str, Any] = {"tier": 1, "tenant": "t", "reply_to": "r", "signature": "", "max_queue_size": 0}
    far_ms = int(time.time() * 1000) + 60_000
    old_small, old_large, new = payload(1, 100), payload(2, LUA_PAYLOAD_BYTES), payload(3)
    assert (await queue.enqueue(KEYS, "old-small", payload=old_small, deadline_ms=far_ms, **common)).code == 1
    assert (await queue.enqueue(KEYS, "old-large", payload=old_large, deadline_ms=far_ms, **common)).code == 1
    assert await redis.hstrlen(KEYS.job("old-large"), "b") == old_large.nbytes
    assert await enqueue(queue, "new", new) == Enqueued.ENQUEUED
    batch = await claim(queue)
    assert dict(batch.jobs) == {"old-small": wire(old_small), "old-large": wire(old_large), "new": wire(new)}


async def test_the_table_says_payload_keys_only_while_every_live_worker_reads_them(tmp_path: Path) -> None:
    repository = write_example_repository(tmp_path, ["mlp"])
    core = RouterCore([load_model(repository / "mlp", 1)])
    assert not core.snapshot().payload_keys  # no worker yet
    await core.report("new", "cpu", set(), draining=False, payload_keys=True)
    assert core.snapshot().payload_keys
    await core.report("old", "cuda:0", set(), draining=False)  # a report without the field
    assert not core.snapshot().payload_keys
    generation = core.snapshot().generation
    await core.report("old", "cuda:0", set(), draining=False, payload_keys=True)  # upgraded in place
    assert core.snapshot().payload_keys
    assert core.snapshot().generation > generation


async def test_a_mesh_of_new_workers_sends_large_payloads_through_their_keys(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    mesh = await start_mesh(redis_url, write_example_repository(tmp_path, ["scale_any"]))
    side = 64  # 16 KiB
    assert 4 * side * side > KEY_PAYLOAD_BYTES
    before = (await redis.info("commandstats")).get("cmdstat_set", {}).get("calls", 0)
    try:
        assert mesh.gateway.gateway.routing.view.payload_keys
        image = np.arange(side * side, dtype=np.float32).reshape(1, 1, side, side)
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            reply = await infer_stub(channel).ModelInfer(
                infer_request("scale_any", {"image": image}), timeout=RPC_TIMEOUT_S
            )
    finally:
        await stop_mesh(mesh)
    assert np.array_equal(output_arrays(reply)["scaled"], image * 2 + 1)
    assert (await redis.info("commandstats"))["cmdstat_set"]["calls"] == before + 1
    assert await queue_leftovers(redis) == []


async def test_a_duplicate_whose_original_finished_in_between_is_queued_afresh(
    queue: QueueProtocol, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The duplicate's SET meets the original's payload (NX keeps it), the original is
    acked before the duplicate's script runs: the script finds no payload, and the
    enqueue writes it again and queues the job, instead of leaving its caller waiting."""
    assert await enqueue(queue, "a", payload(1)) == Enqueued.ENQUEUED
    batch = await claim(queue)
    original_set = QueueProtocol._enqueue_beside
    acked: list[int] = []

    async def ack_in_between(self: QueueProtocol, writes: Any, script_keys: Any, args: Any) -> Enqueued:
        if not acked:  # after the first SET, before its script: the original finishes
            await self.redis.pipeline(list(writes))
            acked.append(await queue.ack(KEYS, batch.token, ["a"]))
            return await original_set(self, [], script_keys, args)
        return await original_set(self, writes, script_keys, args)

    monkeypatch.setattr(QueueProtocol, "_enqueue_beside", ack_in_between)
    assert await enqueue(queue, "a", payload(2)) == Enqueued.ENQUEUED
    assert acked == [1]
    assert await redis.get(KEYS.payload("a")) == wire(payload(2))
