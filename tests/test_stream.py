"""ModelStreamInfer in process: many requests in flight on one stream, their ids,
errors in ``error_message`` or as the stream's status (``triton_grpc_error``), the
bound on requests in flight, and a cancelled stream's queued requests withdrawn.

tritonclient's own stream calls: tests/compat/test_tritonclient.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from redis.asyncio import Redis

from meshserve.queue import ModelKeys
from meshserve.tenancy.tenants import hash_key
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

RPC_TIMEOUT_S = 20


def adder(value: int, request_id: str, **kwargs: Any) -> pb.ModelInferRequest:
    a = np.full((1, 4), value, dtype=np.int64)
    return infer_request("adder_fixed", {"a": a, "b": np.ones((1, 4), np.int64)}, request_id=request_id, **kwargs)


async def answers(call: Any, count: int) -> list[pb.ModelStreamInferResponse]:
    got = []
    for _ in range(count):
        response = await call.read()
        assert response is not grpc.aio.EOF, f"stream ended after {len(got)} answers of {count}"
        got.append(response)
    return got


async def test_many_requests_in_flight_each_answered_with_its_id(
    mesh: Mesh, stub: pb_grpc.GRPCInferenceServiceStub, redis: Redis
) -> None:
    count = 12
    worker = mesh.workers[0]
    await hold_serving(worker)
    call = stub.ModelStreamInfer(timeout=RPC_TIMEOUT_S)
    for index in range(count):
        await call.write(adder(index, f"req-{index}", priority=1 + index % 2))
    await wait_queued(redis, "adder_fixed", count)  # every one is queued at once: all in flight
    release_serving(worker)
    got = await answers(call, count)
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK
    by_id = {r.infer_response.id: r for r in got}
    assert sorted(by_id) == sorted(f"req-{i}" for i in range(count))
    for index in range(count):
        response = by_id[f"req-{index}"]
        assert response.error_message == ""
        assert response.infer_response.model_name == "adder_fixed"
        assert output_arrays(response.infer_response)["sum"].tolist() == [[index + 1] * 4]


async def test_each_request_of_a_stream_has_its_own_priority(
    mesh: Mesh, stub: pb_grpc.GRPCInferenceServiceStub, redis: Redis
) -> None:
    """adder_fixed is not batchable: the worker takes one request per run, in the
    queue's order, so the answers come back highest tier first."""
    worker = mesh.workers[0]
    await hold_serving(worker)
    call = stub.ModelStreamInfer(timeout=RPC_TIMEOUT_S)
    arrivals = [("low", 3), ("standard", None), ("high", 1)]
    for index, (label, priority) in enumerate(arrivals):
        await call.write(adder(index, label, priority=priority))
    await wait_queued(redis, "adder_fixed", len(arrivals))
    release_serving(worker)
    order = [r.infer_response.id for r in await answers(call, len(arrivals))]
    await call.done_writing()
    assert order == ["high", "standard", "low"]


async def test_a_request_past_its_timeout_parameter_fails_alone(
    mesh: Mesh, stub: pb_grpc.GRPCInferenceServiceStub, redis: Redis
) -> None:
    worker = mesh.workers[0]
    await hold_serving(worker)
    call = stub.ModelStreamInfer(timeout=RPC_TIMEOUT_S)
    await call.write(adder(1, "short", timeout_us=1))  # 1 µs: past before it is queued
    (first,) = await answers(call, 1)
    await call.write(adder(2, "long"))
    await wait_queued(redis, "adder_fixed", 1)
    release_serving(worker)
    (second,) = await answers(call, 1)
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK
    assert first.infer_response.id == "short"
    assert "deadline exceeded" in first.error_message
    assert second.infer_response.id == "long"
    assert second.error_message == ""


async def test_errors_arrive_in_error_message_and_the_stream_goes_on(
    mesh: Mesh, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    wrong = infer_request("mlp", {"features": np.ones((1, 64), np.float64)}, request_id="bad-dtype")
    unknown = infer_request("nope", {"x": np.ones(1, np.float32)}, request_id="bad-model")
    call = stub.ModelStreamInfer(timeout=RPC_TIMEOUT_S)
    for request in (wrong, unknown, adder(5, "good")):
        await call.write(request)
    await call.done_writing()
    by_id = {r.infer_response.id: r for r in await answers(call, 3)}
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK
    assert "input 'features': expected FP32, got FP64" in by_id["bad-dtype"].error_message
    assert by_id["bad-dtype"].infer_response.model_name == "mlp"
    assert "unknown model 'nope'" in by_id["bad-model"].error_message
    assert by_id["good"].error_message == ""
    assert output_arrays(by_id["good"].infer_response)["sum"].tolist() == [[6] * 4]


async def test_triton_grpc_error_header_ends_the_stream_with_the_status(
    mesh: Mesh, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    call = stub.ModelStreamInfer(timeout=RPC_TIMEOUT_S, metadata=(("triton_grpc_error", "true"),))
    await call.write(adder(1, "fine"))
    (first,) = await answers(call, 1)
    assert first.infer_response.id == "fine"
    await call.write(infer_request("mlp", {"features": np.ones((1, 64), np.float64)}))
    with pytest.raises(grpc.aio.AioRpcError):
        await call.read()
    assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'features': expected FP32, got FP64" in await call.details()


async def test_an_unauthenticated_stream_is_refused(
    redis: Redis, redis_url: str, model_repository: Path, tmp_path: Path
) -> None:

    path = tmp_path / "tenants.yaml"
    path.write_text(
        f'tenants:\n  - name: acme\n    api_keys: ["{hash_key("acme-key")}"]\n    models: ["adder_fixed"]\n'
    )
    mesh = await start_mesh(redis_url, model_repository, tenants_path=path)
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            refused = stub.ModelStreamInfer(timeout=RPC_TIMEOUT_S, metadata=(("authorization", "Bearer wrong"),))
            await refused.write(adder(1, "x"))
            assert await refused.code() == grpc.StatusCode.UNAUTHENTICATED
            call = stub.ModelStreamInfer(timeout=RPC_TIMEOUT_S, metadata=(("authorization", "Bearer acme-key"),))
            await call.write(adder(1, "ok"))
            await call.write(infer_request("mlp", {"features": np.ones((1, 64), np.float32)}, request_id="denied"))
            await call.done_writing()
            by_id = {r.infer_response.id: r for r in await answers(call, 2)}
            assert by_id["ok"].error_message == ""
            assert "not available to tenant 'acme'" in by_id["denied"].error_message
    finally:
        await stop_mesh(mesh)


@pytest.fixture
async def bounded_mesh(redis: Redis, redis_url: str, model_repository: Path) -> AsyncIterator[Mesh]:
    mesh = await start_mesh(redis_url, model_repository, max_stream_inflight=2)
    try:
        yield mesh
    finally:
        await stop_mesh(mesh)


async def test_the_gateway_stops_reading_at_the_bound(bounded_mesh: Mesh, redis: Redis) -> None:
    worker = bounded_mesh.workers[0]
    await hold_serving(worker)
    async with grpc.aio.insecure_channel(bounded_mesh.address) as channel:
        stub = infer_stub(channel)
        call = stub.ModelStreamInfer(timeout=RPC_TIMEOUT_S)
        for index in range(5):
            await call.write(adder(index, f"r{index}"))
        await wait_queued(redis, "adder_fixed", 2)
        # a round trip on the same connection, after the five writes: the gateway has
        # received them all, and reads no third while two are unanswered
        await stub.ModelMetadata(pb.ModelMetadataRequest(name="adder_fixed"), timeout=RPC_TIMEOUT_S)
        assert await redis.zcard(ModelKeys.for_model("adder_fixed", 1).ready) == 2
        assert len(bounded_mesh.gateway.gateway.pending) == 2
        release_serving(worker)
        await call.done_writing()
        got = await answers(call, 5)
        assert await call.code() == grpc.StatusCode.OK
    assert sorted(r.infer_response.id for r in got) == [f"r{i}" for i in range(5)]


async def until(predicate: Any) -> None:
    """Until ``predicate()`` holds, looked at every 10 ms for at most 10 s."""
    async with asyncio.timeout(10):
        while not predicate():  # noqa: ASYNC110 (bounded poll: nothing signals a handler's end)
            await asyncio.sleep(0.01)


async def test_a_cancelled_stream_withdraws_its_queued_requests(
    mesh: Mesh, stub: pb_grpc.GRPCInferenceServiceStub, redis: Redis
) -> None:
    worker = mesh.workers[0]
    await hold_serving(worker)
    call = stub.ModelStreamInfer(timeout=RPC_TIMEOUT_S)
    for index in range(4):
        await call.write(adder(index, f"c{index}"))
    await wait_queued(redis, "adder_fixed", 4)
    gateway = mesh.gateway.gateway
    assert len(gateway.pending) == 4
    call.cancel()
    await until(lambda: not gateway.pending and not gateway.queued)  # the gateway forgets them
    await gateway.settle()  # the withdrawals
    assert await queue_leftovers(redis) == []  # nothing left for a worker to compute
    release_serving(worker)
    # the mesh still serves
    response = await stub.ModelInfer(adder(7, "after"), timeout=RPC_TIMEOUT_S)
    assert output_arrays(response)["sum"].tolist() == [[8] * 4]
