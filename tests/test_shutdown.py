"""Shutdown with requests in flight: every accepted request gets an answer (invariant 1).

A gateway stopping with a grace period answers what it holds, refuses new calls,
and cancels what is left at the end of the grace with an explicit status. A
worker stopping gives back what it took but did not start, at once, and leaves
no lease behind; another worker serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio import Redis

from meshserve.devkit.examples import write_example_repository
from meshserve.queue import ModelKeys
from meshserve.settings import WorkerSettings
from model_workers.server import WorkerServer
from protos import grpc_service_pb2_grpc as pb_grpc
from tests.support import (
    Mesh,
    hold_serving,
    infer_request,
    infer_stub,
    output_arrays,
    queue_leftovers,
    release_serving,
    start_mesh,
    stop_mesh,
    wait_queued,
)

RPC_TIMEOUT_S = 20
MLP = ModelKeys.for_model("mlp", 1)


def features(seed: int) -> dict[str, np.ndarray]:
    return {"features": np.full((1, 64), seed, dtype=np.float32)}


def send(stub: pb_grpc.GRPCInferenceServiceStub, count: int) -> list[asyncio.Future]:
    return [
        asyncio.ensure_future(stub.ModelInfer(infer_request("mlp", features(i)), timeout=RPC_TIMEOUT_S))
        for i in range(count)
    ]


async def begin_gateway_stop(mesh: Mesh, channel: grpc.aio.Channel, grace_s: float) -> asyncio.Task[None]:
    """Start stopping the gateway; return once its health service says NOT_SERVING
    (it has begun to shut down), with the stop still draining in the task."""
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
    try:
        updates = aiter(watch)
        assert (await anext(updates)).status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.create_task(mesh.gateway.stop(grace_s=grace_s))
        assert (await anext(updates)).status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        watch.cancel()  # an open stream would hold the gateway's drain for the whole grace
    return stopping


async def test_gateway_drains_in_flight_requests_and_refuses_new_ones(mesh: Mesh, redis: Redis) -> None:
    worker = mesh.workers[0]
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        stub = infer_stub(channel)
        await stub.ModelInfer(infer_request("mlp", features(0)), timeout=RPC_TIMEOUT_S)  # the channel is up
        await hold_serving(worker)
        try:
            calls = send(stub, 8)
            await wait_queued(redis, "mlp", 8)
            stopping = await begin_gateway_stop(mesh, channel, grace_s=15)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ModelInfer(infer_request("mlp", features(99)), timeout=RPC_TIMEOUT_S)
        finally:
            release_serving(worker)
        async with asyncio.timeout(RPC_TIMEOUT_S):
            responses = await asyncio.gather(*calls)
            await stopping

    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert refused.value.details()
    for i, response in enumerate(responses):
        assert output_arrays(response)["logits"].shape == (1, 10), i
    assert worker.worker.served[("mlp", 1)].stats.requests == 1 + 8
    assert await queue_leftovers(redis) == []


async def test_gateway_cancels_what_is_left_when_the_grace_ends(mesh: Mesh, redis: Redis) -> None:
    worker = mesh.workers[0]
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        await hold_serving(worker)
        try:
            calls = send(infer_stub(channel), 4)
            await wait_queued(redis, "mlp", 4)
            await mesh.gateway.stop(grace_s=0.2)
            async with asyncio.timeout(5):  # answered by the end of the grace, not by the 20 s deadline
                results = await asyncio.gather(*calls, return_exceptions=True)
        finally:
            release_serving(worker)

    assert len(results) == 4
    for result in results:
        assert isinstance(result, grpc.aio.AioRpcError), result
        assert result.code() == grpc.StatusCode.UNAVAILABLE
        assert "Cancelling all calls" in (result.details() or "")
    assert mesh.gateway.gateway.pending == {}


@contextlib.asynccontextmanager
async def zadd_events(redis: Redis, key: str) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """Subscribe to Redis keyspace events of ``key``; yields "wait for the next ZADD"."""
    await redis.config_set("notify-keyspace-events", "Kz")
    pubsub = redis.pubsub()
    try:
        await pubsub.subscribe(f"__keyspace@0__:{key}")

        async def next_zadd() -> None:
            async with asyncio.timeout(10):
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=10)
                    if message is not None and message["data"] == b"zadd":
                        return

        yield next_zadd
    finally:
        await pubsub.aclose()
        await redis.config_set("notify-keyspace-events", "")


async def test_worker_stop_gives_back_the_batch_in_hand_and_another_worker_serves_it(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    # mlp holds a partial batch for up to 1 s (the queue delay): the worker is stopped meanwhile
    repository = write_example_repository(tmp_path, ["mlp", "scale_any"])
    (repository / "mlp" / "config.yaml").write_text("dynamic_batching:\n  max_queue_delay_ms: 1000\n")
    mesh = await start_mesh(redis_url, repository)
    first = mesh.workers[0]
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            await hold_serving(first)
            try:
                mlp_calls = send(stub, 3)
                await wait_queued(redis, "mlp", 3)
                image = np.ones((1, 1, 2, 2), dtype=np.float32)
                scale_calls = [
                    asyncio.ensure_future(stub.ModelInfer(infer_request("scale_any", {"image": image}), timeout=20))
                    for _ in range(2)
                ]
                await wait_queued(redis, "scale_any", 2)
                async with zadd_events(redis, MLP.inflight) as leased:
                    release_serving(first)
                    await leased()  # the worker now holds the 3 mlp requests, waiting to fill the batch
            finally:
                if first.tasks["serve"].done():  # still held: something above failed
                    release_serving(first)
            await first.stop()
            mesh.workers.remove(first)
            inflight_after_stop = await redis.zcard(MLP.inflight)
            mlp_requeued = await redis.zrange(MLP.ready, 0, -1)
            attempts = [await redis.hget(MLP.job(job_id.decode()), "a") for job_id in mlp_requeued]
            scale_queued = await redis.zcard(ModelKeys.for_model("scale_any", 1).ready)

            second = WorkerServer(
                WorkerSettings(redis_url=redis_url, router_address=mesh.router.address, model_repository=repository)
            )
            await second.start()
            mesh.workers.append(second)
            async with asyncio.timeout(RPC_TIMEOUT_S):
                mlp_responses = await asyncio.gather(*mlp_calls)
                scale_responses = await asyncio.gather(*scale_calls)
    finally:
        await stop_mesh(mesh)

    # Stopping, the worker ran nothing it had not started: the batch went back to
    # the queue at once (no lease left to expire), its attempt not counted.
    assert inflight_after_stop == 0
    assert len(mlp_requeued) == 3
    assert attempts == [b"0", b"0", b"0"]
    assert scale_queued == 2  # not taken by the stopping worker
    assert all(output_arrays(r)["logits"].shape == (1, 10) for r in mlp_responses)
    assert all(output_arrays(r)["scaled"].tolist() == [[[[3.0, 3.0], [3.0, 3.0]]]] for r in scale_responses)
    first_items = {key: served.stats.items for key, served in first.worker.served.items()}
    second_items = {key: served.stats.items for key, served in second.worker.served.items()}
    assert first_items == {("mlp", 1): 0, ("scale_any", 1): 0}
    assert second_items == {("mlp", 1): 3, ("scale_any", 1): 2}  # each request computed once
    assert await queue_leftovers(redis) == []


async def test_requests_after_the_last_worker_stops_are_unavailable(mesh: Mesh, redis: Redis) -> None:
    worker = mesh.workers.pop()
    await worker.stop()
    gateway = mesh.gateway.gateway
    async with asyncio.timeout(10):
        await mesh.gateway.routing.wait_for(lambda _: not gateway.model_ready(gateway.resolve("mlp", "")))

    async with grpc.aio.insecure_channel(mesh.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await infer_stub(channel).ModelInfer(infer_request("mlp", features(1)), timeout=RPC_TIMEOUT_S)

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "model 'mlp' version 1 is not ready" in (caught.value.details() or "")
    assert await queue_leftovers(redis) == []


async def test_a_stopping_gateway_answers_through_its_lame_duck_period(
    redis: Redis, redis_url: str, model_repository: Path
) -> None:
    """NOT_SERVING first, while calls are still answered: balancers leave before
    the drain, during which grpcio would cancel newly arriving calls."""
    mesh = await start_mesh(redis_url, model_repository, lame_duck_s=3.0)
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            stopping = asyncio.create_task(mesh.gateway.stop(grace_s=2))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
            response = await infer_stub(channel).ModelInfer(infer_request("mlp", features(1)), timeout=2)
            assert output_arrays(response)["logits"].shape == (1, 10)
            await stopping
    finally:
        for worker in mesh.workers:
            await worker.stop()
        await mesh.router.stop()
