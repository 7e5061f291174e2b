"""Decoupled Python models through the whole mesh: a generator ``execute`` answers many
responses per request over ModelStreamInfer, on the same partial-reply path as the
``generate`` mode (model_workers/python_stream.py; docs/models.md "Decoupled Python models").

tritonclient's stream calls on the same model: tests/compat/test_tritonclient_python_decoupled.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from redis.asyncio import Redis

from meshserve.devkit.examples import write_example_repository
from meshserve.queue import ModelKeys
from meshserve_bench.python_hop import measure_stream
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from tests.python_models import write_streamer
from tests.support import (
    Mesh,
    hold_serving,
    infer_request,
    infer_stub,
    output_arrays,
    release_serving,
    start_mesh,
    stop_mesh,
    wait_queued,
)

RPC_TIMEOUT_S = 20
FINAL = "triton_final_response"
ALLOWED = {"allow_python_models": True}


@pytest.fixture
async def mesh(redis: Redis, redis_url: str, tmp_path: Path) -> AsyncIterator[Mesh]:
    repository = tmp_path / "repo"
    write_streamer(repository)
    mesh = await start_mesh(redis_url, repository, worker_overrides=ALLOWED)
    try:
        yield mesh
    finally:
        await stop_mesh(mesh)


def count_request(n: int, request_id: str) -> pb.ModelInferRequest:
    return infer_request("streamer", {"n": np.array([[n]], np.int32)}, request_id=request_id)


async def read_request(call: Any) -> tuple[list[int], list[bool], str]:
    """One request's responses until its final one or an error: (values, final flags, error)."""
    values: list[int] = []
    flags: list[bool] = []
    while True:
        response = await call.read()
        assert response is not grpc.aio.EOF, f"stream ended after {len(values)} responses"
        if response.error_message:
            return values, flags, response.error_message
        final = response.infer_response.parameters[FINAL].bool_param
        flags.append(final)
        if response.infer_response.outputs:
            values.append(int(output_arrays(response.infer_response)["i"][0, 0]))
        if final:
            return values, flags, ""


async def test_a_generator_execute_streams_its_responses_in_order_the_returned_one_final(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        call = infer_stub(channel).ModelStreamInfer(timeout=RPC_TIMEOUT_S)
        await call.write(count_request(5, "five"))
        values, flags, error = await read_request(call)
        await call.write(count_request(1, "one"))
        one = await read_request(call)
        await call.done_writing()
    assert (values, flags, error) == ([0, 1, 2, 3, 4], [False] * 4 + [True], "")
    assert one == ([0], [True], "")


async def test_requests_batched_together_each_get_their_rows(mesh: Mesh, redis: Redis) -> None:
    """Three requests claimed as one batch: one execute, each request its own stream."""
    await hold_serving(mesh.workers[0])
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        stub = infer_stub(channel)
        calls = [stub.ModelStreamInfer(timeout=RPC_TIMEOUT_S) for _ in range(3)]
        for index, call in enumerate(calls):
            await call.write(count_request(3, f"r{index}"))
        await wait_queued(redis, "streamer", 3)
        release_serving(mesh.workers[0])
        results = await asyncio.gather(*(read_request(call) for call in calls))
        for call in calls:
            await call.done_writing()
    assert results == [([0, 1, 2], [False, False, True], "")] * 3


async def test_model_infer_on_a_decoupled_python_model_is_refused(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await infer_stub(channel).ModelInfer(count_request(3, "x"), timeout=RPC_TIMEOUT_S)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "decoupled" in (refused.value.details() or "")


async def test_model_config_says_the_model_is_decoupled(mesh: Mesh) -> None:
    """As Triton's: clients read model_transaction_policy to choose the stream."""
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        config = (await infer_stub(channel).ModelConfig(pb.ModelConfigRequest(name="streamer"), timeout=5)).config
    assert config.model_transaction_policy.decoupled


async def test_an_exception_mid_stream_names_the_model_and_type_after_the_responses_sent(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        call = infer_stub(channel).ModelStreamInfer(timeout=RPC_TIMEOUT_S)
        await call.write(count_request(-1, "raises"))
        values, flags, error = await read_request(call)
        await call.write(count_request(2, "after"))
        after = await read_request(call)
        await call.done_writing()
    assert values == [0, 1]
    assert flags == [False, False]
    assert "model 'streamer'" in error
    assert "ValueError: n is -1" in error
    assert "2 responses of this request were sent" in error
    assert "Traceback" not in error
    assert after == ([0, 1], [False, True], "")


async def test_a_crash_mid_stream_fails_it_unavailable_and_a_fresh_process_serves(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        call = infer_stub(channel).ModelStreamInfer(timeout=RPC_TIMEOUT_S)
        await call.write(count_request(-2, "exits"))
        values, _, error = await read_request(call)
        await call.write(count_request(3, "fresh"))
        fresh = await read_request(call)
        await call.done_writing()
    assert values == [0, 1]
    assert "UNAVAILABLE" in error or "exit code 3" in error
    assert "model 'streamer'" in error
    assert "exit code 3" in error
    assert fresh == ([0, 1, 2], [False, False, True], "")


async def test_a_cancelled_stream_closes_the_models_iterator_and_acks_the_job(
    mesh: Mesh, redis: Redis, tmp_path: Path
) -> None:
    """A stream of 100 000 responses (10 ms apart) whose client cancels: the worker's next
    partial is refused, the generator is closed (GeneratorExit in model.py) and the job acked."""
    marker = tmp_path / "repo" / "streamer" / "1" / "closed"
    assert not marker.exists()
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        call = infer_stub(channel).ModelStreamInfer(timeout=RPC_TIMEOUT_S)
        await call.write(count_request(100_000, "gone"))
        await call.read()
        call.cancel()
    async with asyncio.timeout(10):  # the whole stream would take over 15 minutes
        while not marker.exists():  # noqa: ASYNC110 (bounded poll: the close runs in another process)
            await asyncio.sleep(0.02)
        await mesh.workers[0].worker.leases.flushed()
        while await redis.zcard(ModelKeys.for_model("streamer", 1).inflight):  # noqa: ASYNC110 (the ack is a write of the worker's)
            await asyncio.sleep(0.02)


async def test_a_request_past_its_deadline_mid_stream_ends_deadline_exceeded(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        stub: pb_grpc.GRPCInferenceServiceStub = infer_stub(channel)
        call = stub.ModelStreamInfer(timeout=RPC_TIMEOUT_S)
        request = count_request(100_000, "due")
        request.parameters["timeout"].int64_param = 300_000  # µs: 300 ms
        await call.write(request)
        values, _, error = await read_request(call)
        await call.done_writing()
    assert values
    assert len(values) < 100_000
    assert "deadline" in error.lower()


def test_the_stream_hop_bench_answers_every_response() -> None:
    assert measure_stream(1024, calls=2) > 0  # raises when a response is not the input


async def test_a_worker_stopped_mid_stream_ends_it_unavailable_with_the_count(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        call = infer_stub(channel).ModelStreamInfer(timeout=RPC_TIMEOUT_S)
        await call.write(count_request(100_000, "cut"))
        first = await call.read()  # the stream is under way
        assert not first.infer_response.parameters[FINAL].bool_param
        await mesh.workers[0].stop()
        values, flags, error = await read_request(call)
    sent = 1 + len(values)
    assert f"after {sent} responses were sent" in error
    assert not any(flags)
    mesh.workers.clear()  # stopped already


async def test_a_worker_lost_mid_stream_leaves_the_request_unavailable_with_the_count(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    """The streaming worker is lost (its serve loop, reaper and batch task end, its lease
    lapses): the other worker claims the job, finds responses were sent, and answers
    UNAVAILABLE with the count instead of streaming them again; the lost worker's next
    partial is refused, so its generator is closed."""
    repository = tmp_path / "repo"
    write_streamer(repository)
    mesh = await start_mesh(redis_url, repository, workers=2, worker_overrides={**ALLOWED, "lease_ms": 600})
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            call = infer_stub(channel).ModelStreamInfer(timeout=RPC_TIMEOUT_S)
            await call.write(count_request(100_000, "lost"))
            await call.read()  # streaming somewhere
            assert not (repository / "streamer" / "1" / "closed").exists()
            streaming = [server for server in mesh.workers if server.worker.runner.detached()]
            assert len(streaming) == 1
            lost = streaming[0]
            for name in ("serve", "reaper"):
                lost.tasks[name].cancel()
            for task in lost.worker.runner.detached():
                task.cancel()  # its lease is no longer extended; its thread streams on, unheard
            values, flags, error = await read_request(call)
            await call.done_writing()
        sent = 1 + len(values)
        assert not any(flags)
        assert f"lost after {sent} responses were sent" in error
        marker = repository / "streamer" / "1" / "closed"
        async with asyncio.timeout(10):
            while not marker.exists():  # noqa: ASYNC110 (the close runs in the model's process)
                await asyncio.sleep(0.02)
    finally:
        await stop_mesh(mesh)


async def test_a_response_over_the_message_limit_ends_its_request_resource_exhausted(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    repository = tmp_path / "repo"
    write_streamer(repository)
    mesh = await start_mesh(redis_url, repository, worker_overrides={**ALLOWED, "max_message_bytes": 3})
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            call = infer_stub(channel).ModelStreamInfer(timeout=RPC_TIMEOUT_S)
            await call.write(count_request(3, "big"))  # each response is 4 bytes of INT32
            values, _, error = await read_request(call)
            await call.done_writing()
        assert values == []
        assert "over the limit of 3 bytes" in error
    finally:
        await stop_mesh(mesh)


async def test_a_long_stream_holds_no_compute_slot_so_an_onnx_model_goes_on(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    """A worker with one compute slot: a stream of 100 000 responses in progress does not
    keep the ONNX model beside it from answering (the stream waits on its process, not
    on the worker's run pool)."""
    repository = write_example_repository(tmp_path / "repo", ["mlp"])
    write_streamer(repository)
    mesh = await start_mesh(redis_url, repository, worker_overrides={**ALLOWED, "compute_slots": 1})
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            call = stub.ModelStreamInfer(timeout=RPC_TIMEOUT_S)
            await call.write(count_request(100_000, "long"))
            await call.read()  # the stream is under way
            for _ in range(3):
                features = np.ones((1, 64), np.float32)
                reply = await stub.ModelInfer(infer_request("mlp", {"features": features}), timeout=10)
                assert output_arrays(reply)["logits"].shape == (1, 10)
            call.cancel()
    finally:
        await stop_mesh(mesh)


async def test_the_execution_timeout_bounds_the_wait_for_each_response_not_the_stream(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    """execution_timeout_ms 400: seven responses 100 ms apart (600 ms in all) stream to
    the end; a model silent after its first response is killed at the limit."""
    repository = tmp_path / "repo"
    write_streamer(repository, timeout_ms=400)
    mesh = await start_mesh(redis_url, repository, worker_overrides=ALLOWED)
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            call = infer_stub(channel).ModelStreamInfer(timeout=RPC_TIMEOUT_S)
            request = count_request(-3, "paced")
            request.parameters["triton_enable_empty_final_response"].bool_param = True
            await call.write(request)
            paced = await read_request(call)
            await call.write(count_request(-4, "silent"))
            silent = await read_request(call)
            await call.done_writing()
        assert paced == ([0, 1, 2, 3, 4, 5, 6], [False] * 7 + [True], "")  # the final flag alone, as asked
        assert silent[0] == [0]
        assert "execution timeout of 400 ms" in silent[2]
    finally:
        await stop_mesh(mesh)
