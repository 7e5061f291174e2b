"""Priority under saturation (invariant 4) and deadlines (invariant 2).

The worker's serve loop is held while requests queue, so the queue's order is
fixed before the worker looks. ``adder_fixed`` is not batchable: the worker
takes one request per run, and the order it answers them in is the queue's.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from redis.asyncio import Redis

from meshserve.devkit.examples import write_example_repository
from meshserve.queue import ModelKeys
from protos import grpc_service_pb2 as pb
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

RPC_TIMEOUT_S = 10


def adder_request(value: int, priority: int | None) -> pb.ModelInferRequest:
    a = np.full((1, 4), value, dtype=np.int64)
    return infer_request("adder_fixed", {"a": a, "b": np.zeros((1, 4), np.int64)}, priority=priority)


def features() -> dict[str, np.ndarray]:
    return {"features": np.ones((1, 64), dtype=np.float32)}


async def test_higher_tiers_are_served_first_and_fifo_within_a_tier(
    mesh: Mesh, stub: pb_grpc.GRPCInferenceServiceStub, redis: Redis
) -> None:
    # (label, priority parameter): 1 is the highest tier, 0/absent the default, 3 and up the lowest
    arrivals = [("low-1", 3), ("std-1", None), ("high-1", 1), ("low-2", 100), ("std-2", 2), ("high-2", 1)]
    answered: list[str] = []

    async def call(index: int, label: str, priority: int | None) -> None:
        response = await stub.ModelInfer(adder_request(index, priority), timeout=RPC_TIMEOUT_S)
        assert output_arrays(response)["sum"].tolist() == [[index] * 4]
        answered.append(label)

    worker = mesh.workers[0]
    await hold_serving(worker)
    calls = []
    try:
        for index, (label, priority) in enumerate(arrivals):  # one at a time: arrival order is known
            calls.append(asyncio.create_task(call(index, label, priority)))
            await wait_queued(redis, "adder_fixed", index + 1)
    finally:
        release_serving(worker)
    await asyncio.gather(*calls)

    assert answered == ["high-1", "high-2", "std-1", "std-2", "low-1", "low-2"]
    assert mesh.workers[0].worker.served[("adder_fixed", 1)].stats.batches == len(arrivals)
    assert await queue_leftovers(redis) == []


async def test_request_expiring_in_the_queue_is_answered_and_never_computed(
    mesh: Mesh, stub: pb_grpc.GRPCInferenceServiceStub, redis: Redis
) -> None:
    worker = mesh.workers[0]
    stats = worker.worker.served[("mlp", 1)].stats
    await hold_serving(worker)
    try:
        # the timeout parameter (int64 microseconds) cuts the 10 s gRPC deadline to 1 s:
        # room for a loaded machine to enqueue it, and for wait_queued to see it, in time
        short = infer_request("mlp", features(), timeout_us=1_000_000)
        call = asyncio.ensure_future(stub.ModelInfer(short, timeout=RPC_TIMEOUT_S))
        await wait_queued(redis, "mlp", 1)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
    finally:
        release_serving(worker)

    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "deadline exceeded waiting for model 'mlp'" in (caught.value.details() or "")
    # Drive the worker past the expired job: one live request behind it.
    response = await stub.ModelInfer(infer_request("mlp", features()), timeout=RPC_TIMEOUT_S)
    assert output_arrays(response)["logits"].shape == (1, 10)
    assert (stats.expired, stats.items, stats.batches) == (1, 1, 1)
    assert await queue_leftovers(redis) == []


async def test_grpc_deadline_travels_with_the_queued_request(
    mesh: Mesh, stub: pb_grpc.GRPCInferenceServiceStub, redis: Redis
) -> None:
    worker = mesh.workers[0]
    stats = worker.worker.served[("mlp", 1)].stats
    keys = ModelKeys.for_model("mlp", 1)
    await hold_serving(worker)
    try:
        sent_ms = time.time() * 1000
        # 2 s: the client cancels then and the gateway withdraws the job, so wait_queued
        # and the look at its hash below must come first, even on a loaded machine
        call = asyncio.ensure_future(stub.ModelInfer(infer_request("mlp", features()), timeout=2.0))
        await wait_queued(redis, "mlp", 1)
        (job_id,) = await redis.zrange(keys.ready, 0, -1)
        deadline_ms = int(await redis.hget(keys.job(job_id.decode()), "d"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
    finally:
        release_serving(worker)

    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "deadline exceeded" in (caught.value.details() or "").lower()
    # the queued deadline is the call's 2 s (plus transit: grpc-timeout is relative), not the 30 s default
    assert sent_ms + 1_000 < deadline_ms < sent_ms + 3_000
    response = await stub.ModelInfer(infer_request("mlp", features()), timeout=RPC_TIMEOUT_S)
    assert output_arrays(response)["logits"].shape == (1, 10)
    # Never computed: the expired job was either withdrawn by the gateway (the client's
    # cancellation arrived first) or dropped by the claim (the gateway's own timer did).
    assert stats.items == 1
    assert stats.expired in (0, 1)
    assert await queue_leftovers(redis) == []


async def test_expired_jobs_do_not_block_live_ones_behind_them(
    mesh: Mesh, stub: pb_grpc.GRPCInferenceServiceStub, redis: Redis
) -> None:
    worker = mesh.workers[0]
    stats = worker.worker.served[("mlp", 1)].stats
    await hold_serving(worker)
    try:
        doomed = [
            asyncio.ensure_future(stub.ModelInfer(infer_request("mlp", features(), timeout_us=1_000_000), timeout=10))
            for _ in range(5)
        ]
        await wait_queued(redis, "mlp", 5)
        live = asyncio.ensure_future(stub.ModelInfer(infer_request("mlp", features()), timeout=RPC_TIMEOUT_S))
        await wait_queued(redis, "mlp", 6)
        results = await asyncio.gather(*doomed, return_exceptions=True)
    finally:
        release_serving(worker)

    assert all(isinstance(r, grpc.aio.AioRpcError) for r in results)
    assert {r.code() for r in results if isinstance(r, grpc.aio.AioRpcError)} == {grpc.StatusCode.DEADLINE_EXCEEDED}
    assert output_arrays(await live)["logits"].shape == (1, 10)
    assert (stats.expired, stats.items, stats.batches) == (5, 1, 1)
    assert await queue_leftovers(redis) == []


async def test_request_expiring_while_its_batch_fills_is_not_computed(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    # The worker claims both requests at once, then holds the partial batch for up
    # to 3 s: the short one's 1 s deadline passes before compute (or, on a slow
    # machine, before the claim). Either way it is dropped, never run. 1 s leaves a
    # loaded machine time to enqueue both before it passes.
    repository = write_example_repository(tmp_path, ["mlp"])
    (repository / "mlp" / "config.yaml").write_text("dynamic_batching:\n  max_queue_delay_ms: 3000\n")
    mesh = await start_mesh(redis_url, repository)
    worker = mesh.workers[0]
    stats = worker.worker.served[("mlp", 1)].stats
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            await hold_serving(worker)
            try:
                short = asyncio.ensure_future(
                    stub.ModelInfer(infer_request("mlp", features(), timeout_us=1_000_000), timeout=RPC_TIMEOUT_S)
                )
                long = asyncio.ensure_future(stub.ModelInfer(infer_request("mlp", features()), timeout=RPC_TIMEOUT_S))
                await wait_queued(redis, "mlp", 2)
            finally:
                release_serving(worker)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await short
            response = await long
    finally:
        await stop_mesh(mesh)

    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "deadline exceeded" in (caught.value.details() or "")
    assert output_arrays(response)["logits"].shape == (1, 10)
    assert (stats.expired, stats.items, stats.batches) == (1, 1, 1)
    assert await queue_leftovers(redis) == []


async def test_a_request_the_queue_cannot_serve_in_time_is_refused_at_once(
    mesh: Mesh, stub: pb_grpc.GRPCInferenceServiceStub, redis: Redis
) -> None:
    keys = ModelKeys.for_model("adder_fixed", 1)
    worker = mesh.workers[0]
    await hold_serving(worker)
    calls = []
    try:
        seconds, micros = await redis.time()
        await redis.delete(keys.drain)
        # one job each 5 s: 15 s of work ahead of a 1.5 s call, far past it however slow this runs
        await redis.hset(keys.drain, "slow", f"5000 {seconds * 1000 + micros // 1000}")
        for index in range(2):
            # 60 s: far from the 10 s the second one's estimate says (a 10 s timeout sat on
            # that edge, and a loaded machine's late receipt tipped it into a refusal)
            calls.append(asyncio.ensure_future(stub.ModelInfer(adder_request(index, None), timeout=60)))
            await wait_queued(redis, "adder_fixed", index + 1)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ModelInfer(adder_request(7, None), timeout=1.5)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "cannot answer within the deadline" in (refused.value.details() or "")
        trailers = dict(refused.value.trailing_metadata() or ())
        assert int(trailers["retry-after-ms"]) > 0
        assert await redis.zcard(keys.ready) == 2  # the refused call left nothing queued
    finally:
        await redis.delete(keys.drain)
        release_serving(worker)
    answers = await asyncio.gather(*calls)  # the two admitted before it are served
    assert [output_arrays(a)["sum"].tolist() for a in answers] == [[[0] * 4], [[1] * 4]]
