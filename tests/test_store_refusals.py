"""Redis refusing writes while it runs: a full Redis (maxmemory, noeviction) and one
whose eviction policy could drop queued requests. A server of this module's own,
since these tests change its configuration."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError, ResponseError

from gateway.server import GatewayServer
from meshserve.devkit.redis_server import RedisServer
from meshserve.queue import ModelKeys, QueueProtocol, reply_key
from meshserve.settings import GatewaySettings, RouterSettings, WorkerSettings
from meshserve.store.link import Chunks, RedisLink
from meshserve.store.memory import EvictionPolicyError, policy_check
from meshserve.store.refusals import RefusalLog
from meshserve.wire.envelope import reply_error
from model_workers.reply_writer import Outgoing, ReplyWriter
from model_workers.server import WorkerServer
from model_workers.session import LoadedModel
from protos import meshserve_pb2 as mpb
from router.depths import QueueDepths
from router.server import RouterServer
from tests.support import (
    hold_serving,
    infer_request,
    infer_stub,
    queue_leftovers,
    release_serving,
    start_mesh,
    stop_mesh,
    wait_queued,
)

KEYS = ModelKeys.for_model("m", 1)
FAR_MS = 10**13
PAYLOAD = b"x" * 256 * 1024


@pytest.fixture(scope="module")
def store_url() -> Iterator[str]:
    with RedisServer(os.environ.get("MESHSERVE_TEST_REDIS_BINARY") or None) as server:
        yield server.url


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(store_url)
    await client.config_set("maxmemory", 0)
    await client.config_set("maxmemory-policy", "noeviction")
    await client.flushall()
    yield client
    await client.config_set("maxmemory", 0)
    await client.config_set("maxmemory-policy", "noeviction")
    await client.aclose()


@pytest.fixture
async def link(store: Redis, store_url: str) -> AsyncIterator[RedisLink]:
    link = RedisLink(store_url)
    yield link
    await link.aclose()


async def used_bytes(redis: Redis) -> int:
    return int((await redis.info("memory"))["used_memory"])


async def claimed_job(queue: QueueProtocol, job_id: str) -> int:
    """Enqueue a job with a large payload and claim it; the lease token."""
    await queue.enqueue(
        KEYS, job_id, tier=1, payload=PAYLOAD, deadline_ms=FAR_MS, tenant="t", reply_to="r", signature="s",
        max_queue_size=100,
    )  # fmt: skip
    return (await queue.claim(KEYS, max_items=1, lease_ms=60_000, worker_id="w")).token


# ------------------------------------------------------------ the worker's reply writes


@pytest.mark.parametrize(
    "blob",
    [b"result", Chunks.of([b"res", np.frombuffer(b"ult", np.uint8)])],  # Chunks: a framed reply's buffers
    ids=["plain", "framed"],
)
async def test_a_refused_reply_is_not_acked_and_lands_once_memory_is_freed(
    store: Redis, link: RedisLink, blob: bytes | Chunks
) -> None:
    queue = QueueProtocol(link)
    token = await claimed_job(queue, "a")
    writer = ReplyWriter(link, queue)
    replies = reply_key("g")
    await store.config_set("maxmemory", 1)  # below what it uses: every write is refused
    write = asyncio.create_task(writer.send(KEYS, "m", [Outgoing("a", replies, blob, FAR_MS, token)]))
    await link.execute("PING")  # replies come in order: the push's refusal is in
    assert await store.exists(KEYS.job("a"))
    assert await store.zscore(KEYS.inflight, "a") is not None
    assert await store.llen(replies) == 0
    await store.config_set("maxmemory", 0)
    async with asyncio.timeout(5):
        await write
    assert await store.lrange(replies, 0, -1) == [b"result"]
    assert not await store.exists(KEYS.job("a"))  # acked once written
    assert writer.refusals.totals["OOM"] >= 1
    assert writer.dropped == 0


async def test_a_reply_refused_past_the_budget_answers_unavailable(store: Redis, link: RedisLink) -> None:
    queue = QueueProtocol(link)
    token = await claimed_job(queue, "a")
    writer = ReplyWriter(link, queue)
    replies = reply_key("g")
    # Full until the job's 256 KiB payload is freed: the result never fits, a short answer does.
    await store.config_set("maxmemory", await used_bytes(store) - 64 * 1024)
    started_s = time.monotonic()
    result = b"r" * 256 * 1024
    async with asyncio.timeout(10):
        await writer.send(KEYS, "m", [Outgoing("a", replies, result, FAR_MS, token)])
    elapsed_s = time.monotonic() - started_s
    (blob,) = await store.lrange(replies, 0, -1)
    error = reply_error(mpb.InferReply.FromString(blob))
    assert error is not None
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert "queue store out of memory" in error.message
    assert "model 'm'" in error.message
    assert not await store.exists(KEYS.job("a"))  # dropped: never redelivered after its answer
    assert writer.dropped == 1
    print(f"answered UNAVAILABLE {elapsed_s:.2f} s after the first refusal")


def test_refusals_are_logged_once_per_interval_with_their_count(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    refusals = RefusalLog(logging.getLogger("test"), "requests", interval_s=10, clock=lambda: now[0])
    oom = ResponseError("OOM command not allowed when used memory > 'maxmemory'.")
    with caplog.at_level(logging.WARNING, logger="test"):
        assert not refusals.note(ConnectionError("gone"))
        for _ in range(50):
            refusals.note(oom)
        now[0] = 5.0
        refusals.flush()  # within the interval: nothing more
        now[0] = 11.0
        refusals.flush()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("redis refused 1 requests with OOM")
    assert lines[1].startswith("redis refused 49 requests with OOM")
    assert refusals.totals == {"OOM": 50}


# ------------------------------------------------------------ the eviction policy


async def test_a_link_refuses_a_redis_that_may_evict_until_it_is_fixed(store: Redis, store_url: str) -> None:
    await store.config_set("maxmemory-policy", "allkeys-lru")
    link = RedisLink(store_url, check=policy_check(allow_eviction=False, service="gateway"))
    try:
        with pytest.raises(EvictionPolicyError, match=r"maxmemory-policy is 'allkeys-lru'.*--allow-eviction"):
            await link.execute("PING")
        await store.config_set("maxmemory-policy", "noeviction")
        assert await link.execute("PING") == b"PONG"  # checked again on the next connection
        await store.config_set("maxmemory-policy", "volatile-ttl")
        await store.client_kill_filter(_type="normal", skipme=True)  # a reconnect checks it again
        with pytest.raises(EvictionPolicyError, match="volatile-ttl"):
            await link.execute("PING")
    finally:
        await link.aclose()
    lenient = RedisLink(store_url, check=policy_check(allow_eviction=True, service="gateway"))
    try:
        assert await lenient.execute("PING") == b"PONG"
    finally:
        await lenient.aclose()


async def test_every_service_refuses_to_start_on_a_redis_that_may_evict(
    store: Redis, store_url: str, model_repository: Path
) -> None:
    await store.config_set("maxmemory-policy", "allkeys-lru")
    router = RouterServer(RouterSettings(model_repository=model_repository, port=0, redis_url=store_url))
    try:
        with pytest.raises(EvictionPolicyError, match=r"maxmemory-policy.*start the router with --allow-eviction"):
            await router.start()
    finally:
        router.depths.close()
        await router.server.stop(0)
    gateway = GatewayServer(
        GatewaySettings(redis_url=store_url, router_address="127.0.0.1:1", host="127.0.0.1", port=0)
    )
    try:
        with pytest.raises(EvictionPolicyError, match=r"maxmemory-policy.*start the gateway with --allow-eviction"):
            await gateway.start()
    finally:
        await gateway.redis.aclose()
        await gateway.blocking.aclose()
        await gateway.router_channel.close()
        await gateway.server.stop(0)
    worker = WorkerServer(
        WorkerSettings(redis_url=store_url, router_address="127.0.0.1:1", model_repository=model_repository)
    )
    try:
        with pytest.raises(EvictionPolicyError, match=r"maxmemory-policy.*start the worker with --allow-eviction"):
            await worker.start()
    finally:
        await worker.redis.aclose()
        await worker.blocking.aclose()
        await worker.router_channel.close()
        await worker.worker.close()
        await worker.server.stop(0)


# ------------------------------------------------------------ the whole path, full


class _Gate:
    """Once armed, holds the next run of "scale_any" (on the ONNX Runtime thread) until opened."""

    def __init__(self) -> None:
        self.armed = threading.Event()
        self.entered = threading.Event()
        self.open = threading.Event()
        self.real = LoadedModel.run

    def run(self, model: LoadedModel, inputs: dict[str, Any], options: Any = None) -> list[Any]:
        if model.info.name == "scale_any" and self.armed.is_set() and not self.entered.is_set():
            self.entered.set()
            self.open.wait(20)
        return self.real(model, inputs, options)


async def test_a_full_redis_answers_every_accepted_request_within_seconds(
    store: Redis, store_url: str, model_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = _Gate()
    monkeypatch.setattr(LoadedModel, "run", lambda model, inputs, options=None: gate.run(model, inputs, options))
    mesh = await start_mesh(store_url, model_repository, default_timeout_ms=15_000)
    gate.armed.set()
    try:
        for served in mesh.workers[0].worker.served.values():
            served.compute_ms_avg = 0.0  # the next batch runs on the ONNX Runtime thread, where the gate holds it
        image = np.ones((1, 1, 128, 128), dtype=np.float32)  # 64 KiB in, 64 KiB out
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)

            async def call() -> tuple[grpc.StatusCode, str, float]:
                try:
                    await stub.ModelInfer(infer_request("scale_any", {"image": image}), timeout=15)
                    return grpc.StatusCode.OK, "", time.monotonic()
                except grpc.aio.AioRpcError as exc:
                    return exc.code(), exc.details() or "", time.monotonic()

            await hold_serving(mesh.workers[0])  # the four calls queue up, then go in one batch
            calls = [asyncio.create_task(call()) for _ in range(4)]
            await wait_queued(store, "scale_any", 4)
            release_serving(mesh.workers[0])
            async with asyncio.timeout(10):
                await asyncio.to_thread(gate.entered.wait, 10)  # the batch is claimed and computing
            # Full until the claimed jobs are dropped: no result fits, the answers do.
            await store.config_set("maxmemory", await used_bytes(store) - 128 * 1024)
            refused_s = time.monotonic()
            gate.open.set()
            results = await asyncio.gather(*calls)
            waited_s = [at - refused_s for _, _, at in results]
            print("answered after", [f"{s:.2f} s" for s in waited_s], [(c.name, d) for c, d, _ in results])
            assert all(code in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE) for code, _, _ in results)
            assert any("queue store out of memory" in details for _, details, _ in results)
            assert max(waited_s) < 3.0  # about the 1 s retry budget; never the 15 s deadline

            # Nearly full: new requests are refused whole, at once, with the reason.
            await store.config_set("maxmemory", await used_bytes(store) + 16 * 1024)
            await mesh.gateway.gateway.store.read()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ModelInfer(infer_request("scale_any", {"image": image}), timeout=15)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue store full" in (refused.value.details() or "")
            rejections = mesh.gateway.metrics.registry.get_sample_value(
                "meshserve_rejections_total", {"tenant": "dev", "reason": "store_full"}
            )
            assert rejections == 1

            # Memory freed: everything works again, without a restart.
            await store.config_set("maxmemory", 0)
            await mesh.gateway.gateway.store.read()
            reply = await stub.ModelInfer(infer_request("scale_any", {"image": image}), timeout=15)
            assert reply.outputs[0].name == "scaled"
    finally:
        gate.open.set()
        await stop_mesh(mesh)


async def test_queued_requests_are_answered_when_redis_stays_over_its_maxmemory(
    store: Redis, store_url: str, model_repository: Path
) -> None:
    mesh = await start_mesh(store_url, model_repository, store_sample_ms=100)
    try:
        image = np.ones((1, 1, 128, 128), dtype=np.float32)
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            await hold_serving(mesh.workers[0])  # queued, never claimed: as when every claim is refused
            calls = [stub.ModelInfer(infer_request("scale_any", {"image": image}), timeout=15) for _ in range(2)]
            await wait_queued(store, "scale_any", 2)
            await store.config_set("maxmemory", await used_bytes(store) // 2)  # well over, whatever buffers come and go
            over_s = time.monotonic()
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await call
                assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "queue store out of memory" in (failed.value.details() or "")
            waited_s = time.monotonic() - over_s
            print(f"queued calls answered {waited_s:.2f} s after Redis went over its maxmemory")
            assert waited_s < 3.0  # the 1 s it must stay over, a reading's interval; never the 15 s deadline
            assert mesh.gateway.gateway.stranded_jobs == 2
            await store.config_set("maxmemory", 0)
            await mesh.gateway.gateway.store.read()  # not to wait for the next reading
            assert await queue_leftovers(store) == []  # withdrawn: never computed for nobody
            release_serving(mesh.workers[0])
            reply = await stub.ModelInfer(infer_request("scale_any", {"image": image}), timeout=15)
            assert reply.outputs[0].name == "scaled"
    finally:
        await stop_mesh(mesh)


async def test_the_routers_depth_reads_check_the_policy_on_every_connection(
    store: Redis, store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    depths = QueueDepths(store_url)
    try:
        await asyncio.to_thread(depths.check)
        assert await asyncio.to_thread(depths.read, [("m", 1)]) == {
            ("m", 1): {"realtime": 0, "standard": 0, "batch": 0}
        }
        await store.config_set("maxmemory-policy", "allkeys-lfu")
        await store.client_kill_filter(_type="normal", skipme=True)  # the router's next read reconnects
        with caplog.at_level(logging.WARNING, logger="router.depths"):
            assert await asyncio.to_thread(depths.read, [("m", 1)]) == {}
        assert "maxmemory-policy is 'allkeys-lfu'" in caplog.text
    finally:
        depths.close()


async def test_a_refused_enqueue_says_so_and_the_gateway_logs_it_once_per_interval(
    store: Redis, store_url: str, model_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mesh = await start_mesh(store_url, model_repository, store_sample_ms=0)  # no reading: the write itself fails
    try:
        image = np.ones((1, 1, 128, 128), dtype=np.float32)
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            await store.config_set("maxmemory", 1)
            with caplog.at_level(logging.WARNING, logger="gateway.core"):
                for _ in range(3):
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await stub.ModelInfer(infer_request("scale_any", {"image": image}), timeout=15)
                    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                    assert "queue store out of memory" in (refused.value.details() or "")
            lines = [r.getMessage() for r in caplog.records if r.name == "gateway.core"]
            assert len(lines) == 1  # the first refusal; the next two wait for the interval
            assert lines[0].startswith("redis refused 1 requests with OOM")
            assert mesh.gateway.gateway.refusals.totals == {"OOM": 3}
            await store.config_set("maxmemory", 0)
            reply = await stub.ModelInfer(infer_request("scale_any", {"image": image}), timeout=15)
            assert reply.outputs[0].name == "scaled"
    finally:
        await stop_mesh(mesh)
