"""Decoupled models in process: the ``generate`` mode's tokens over ModelStreamInfer,
each response flagged ``triton_final_response`` as Triton does; ModelInfer refused;
greedy generation equal to a loop over ONNX Runtime; max_tokens and the end id;
several requests of different lengths in one step batch; a worker stopped or lost
mid-generation ending the request UNAVAILABLE with the count of responses sent.

tritonclient's stream calls on the generator: tests/compat/test_tritonclient_decoupled.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from redis.asyncio import Redis

from meshserve.devkit.examples import GENERATOR_HIDDEN, write_example_repository
from meshserve.queue import ModelKeys, load_partial_script, partial_command, reply_key, streamed_counts
from meshserve.store.link import RedisLink
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from protos import meshserve_pb2 as mpb
from tests.support import Mesh, infer_request, output_arrays, start_mesh, stop_mesh

RPC_TIMEOUT_S = 20
FINAL = "triton_final_response"
CEILING = 100_000


@pytest.fixture(scope="module")
def generator_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generator, with a ceiling on max_tokens high enough for a generation to
    outlast a worker's stop, and a plain model beside it."""
    root = write_example_repository(tmp_path_factory.mktemp("generator"), ["generator", "adder_fixed"])
    config = root / "generator" / "config.yaml"
    config.write_text(config.read_text().replace("max_tokens: 64", f"max_tokens: {CEILING}"))
    return root


@pytest.fixture
async def mesh(redis: Redis, redis_url: str, generator_repository: Path) -> AsyncIterator[Mesh]:
    mesh = await start_mesh(redis_url, generator_repository)
    try:
        yield mesh
    finally:
        await stop_mesh(mesh)


@pytest.fixture
async def stub(mesh: Mesh) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def prompt_request(prompt: list[int], request_id: str, **parameters: Any) -> pb.ModelInferRequest:
    request = infer_request("generator", {"token_id": np.array(prompt, dtype=np.int64)}, request_id=request_id)
    for name, value in parameters.items():
        if isinstance(value, float):
            request.parameters[name].double_param = value
        else:
            request.parameters[name].int64_param = value
    return request


def reference_tokens(repository: Path, prompt: list[int], count: int, end_id: int = -1) -> list[int]:
    """Greedy generation in process: the step model over ONNX Runtime, one request."""
    session = ort.InferenceSession(
        str(repository / "generator" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    state = np.zeros((1, GENERATOR_HIDDEN), np.float32)
    logits = None
    for token in prompt:
        logits, state = session.run(None, {"token_id": np.array([[token]], np.int64), "state": state})
    tokens: list[int] = []
    while len(tokens) < count:
        assert logits is not None
        token = int(np.argmax(logits[0]))
        tokens.append(token)
        if token == end_id:
            break
        logits, state = session.run(None, {"token_id": np.array([[token]], np.int64), "state": state})
    return tokens


async def read_request(call: Any, request_id: str | None = None) -> tuple[list[int], list[bool], str]:
    """One request's responses off the stream, until its final one or an error:
    (tokens, final flags, error message)."""
    tokens: list[int] = []
    flags: list[bool] = []
    while True:
        response = await call.read()
        assert response is not grpc.aio.EOF, f"stream ended after {len(tokens)} responses"
        if request_id is not None:
            assert response.infer_response.id == request_id
        if response.error_message:
            return tokens, flags, response.error_message
        final = response.infer_response.parameters[FINAL].bool_param
        flags.append(final)
        if response.infer_response.outputs:
            tokens.append(int(output_arrays(response.infer_response)["token"][0]))
        if final:
            return tokens, flags, ""


async def test_greedy_tokens_stream_one_per_response_and_equal_onnx_runtime(
    mesh: Mesh, stub: pb_grpc.GRPCInferenceServiceStub, generator_repository: Path
) -> None:
    call = stub.ModelStreamInfer(timeout=RPC_TIMEOUT_S)
    await call.write(prompt_request([3, 7, 1], "g1", max_tokens=12))
    tokens, flags, error = await read_request(call, "g1")
    await call.done_writing()
    assert error == ""
    assert tokens == reference_tokens(generator_repository, [3, 7, 1], 12)
    assert flags == [False] * 11 + [True]


async def test_end_id_ends_the_request_with_that_token(
    mesh: Mesh, stub: pb_grpc.GRPCInferenceServiceStub, generator_repository: Path
) -> None:
    free = reference_tokens(generator_repository, [5], 20)
    end_id = free[4]  # the fifth token (it may come earlier: the reference says where)
    expected = reference_tokens(generator_repository, [5], 20, end_id=end_id)
    call = stub.ModelStreamInfer(timeout=RPC_TIMEOUT_S)
    await call.write(prompt_request([5], "e", max_tokens=20, end_id=end_id))
    tokens, flags, error = await read_request(call, "e")
    await call.done_writing()
    assert error == ""
    assert tokens == expected
    assert tokens[-1] == end_id
    assert len(tokens) <= 5
    assert flags[-1]
    assert not any(flags[:-1])


async def test_zero_max_tokens_answers_an_empty_final_response_when_asked(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    call = stub.ModelStreamInfer(timeout=RPC_TIMEOUT_S)
    asked = prompt_request([1], "none", max_tokens=0)
    asked.parameters["triton_enable_empty_final_response"].bool_param = True
    await call.write(prompt_request([1], "silent", max_tokens=0))  # not asked: no response, as in Triton
    await call.write(asked)
    tokens, flags, error = await read_request(call, "none")
    await call.done_writing()
    assert (tokens, flags, error) == ([], [True], "")
    assert await call.read() is grpc.aio.EOF


async def test_a_bad_parameter_is_named(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    call = stub.ModelStreamInfer(timeout=RPC_TIMEOUT_S)
    await call.write(prompt_request([1], "bad", max_tokens=CEILING + 1))
    _, _, error = await read_request(call, "bad")
    await call.done_writing()
    assert "max_tokens" in error
    assert f"0..{CEILING}" in error


async def test_model_infer_on_a_decoupled_model_is_refused(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ModelInfer(prompt_request([1], "unary"), timeout=RPC_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "decoupled" in (caught.value.details() or "")
    assert "ModelStreamInfer" in (caught.value.details() or "")


async def test_requests_of_different_lengths_share_step_batches(
    mesh: Mesh, stub: pb_grpc.GRPCInferenceServiceStub, generator_repository: Path
) -> None:
    """Eight requests of different prompt and output lengths at once: each gets its
    own greedy tokens, and the loop took fewer steps than running them one by one."""
    cases = {f"r{i}": ([i + 1] * (1 + i % 3), 4 + 3 * i) for i in range(8)}
    call = stub.ModelStreamInfer(timeout=RPC_TIMEOUT_S)
    for request_id, (prompt, count) in cases.items():
        await call.write(prompt_request(prompt, request_id, max_tokens=count))
    got: dict[str, list[int]] = {request_id: [] for request_id in cases}
    done: set[str] = set()
    while len(done) < len(cases):
        response = await call.read()
        assert response is not grpc.aio.EOF
        assert response.error_message == ""
        request_id = response.infer_response.id
        got[request_id] += [int(t) for t in output_arrays(response.infer_response)["token"]]
        if response.infer_response.parameters[FINAL].bool_param:
            done.add(request_id)
    await call.done_writing()
    for request_id, (prompt, count) in cases.items():
        assert got[request_id] == reference_tokens(generator_repository, prompt, count), request_id
    generator = next(iter(mesh.workers[0].worker.runner.generators().values()))
    alone = sum(len(prompt) - 1 + count for prompt, count in cases.values())
    assert generator.steps < alone


async def test_sampling_with_a_seed_repeats_and_stays_in_the_top_k(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    runs = []
    for run in range(2):
        call = stub.ModelStreamInfer(timeout=RPC_TIMEOUT_S)
        await call.write(prompt_request([2], f"s{run}", max_tokens=10, temperature=1.5, top_k=3, seed=7))
        tokens, _, error = await read_request(call)
        await call.done_writing()
        assert error == ""
        runs.append(tokens)
    assert runs[0] == runs[1]
    assert len(runs[0]) == 10


async def test_a_worker_stopped_mid_generation_ends_the_request_unavailable_with_the_count(
    mesh: Mesh, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    call = stub.ModelStreamInfer(timeout=RPC_TIMEOUT_S)
    await call.write(prompt_request([4], "cut", max_tokens=CEILING))
    first = await call.read()  # generation is under way
    assert not first.infer_response.parameters[FINAL].bool_param
    await mesh.workers[0].stop()
    tokens, flags, error = await read_request(call, "cut")
    sent = 1 + len(tokens)
    assert error, "the stream must say the request ended, not stop silently"
    assert f"after {sent} responses were sent" in error
    assert f"({sent} responses of this request were sent)" in error
    assert not any(flags)
    mesh.workers.clear()  # stopped already


async def test_a_redelivered_job_that_streamed_is_ended_not_restarted(
    mesh: Mesh, stub: pb_grpc.GRPCInferenceServiceStub, link: RedisLink, redis: Redis
) -> None:
    """A job some worker streamed from, then lost (its hash counts 3 responses), is
    answered UNAVAILABLE with that count by the worker that claims it next."""
    keys = ModelKeys.for_model("generator", 1)
    gateway = mesh.gateway.gateway
    original = gateway.queue.enqueue

    async def enqueue_as_streamed(keys_: ModelKeys, job_id: str, **kwargs: Any) -> Any:
        result = await original(keys_, job_id, **kwargs)
        await redis.hset(keys_.job(job_id), "o", 3)  # as REPLY_PARTIAL leaves it
        return result

    gateway.queue.enqueue = enqueue_as_streamed  # type: ignore[method-assign]
    try:
        call = stub.ModelStreamInfer(timeout=RPC_TIMEOUT_S)
        await call.write(prompt_request([4], "again", max_tokens=8))
        tokens, _, error = await read_request(call, "again")
        await call.done_writing()
    finally:
        gateway.queue.enqueue = original  # type: ignore[method-assign]
    assert tokens == []
    assert "lost after 3 responses were sent" in error
    assert "not restarted" in error
    assert await streamed_counts(link, keys, ["absent"]) == [0]


async def test_a_partial_is_pushed_only_under_the_current_lease(link: RedisLink, redis: Redis) -> None:
    keys = ModelKeys.for_model("m", 1)
    to = reply_key("g")
    await load_partial_script(link)
    await redis.hset(keys.job("j"), mapping={"k": 5})
    blob = mpb.InferReply(id="j", more=True).SerializeToString()
    assert await link.pipeline([partial_command(keys, to, [(5, "j", blob), (4, "j", blob)])]) == [[1, 0]]
    assert await redis.lrange(to, 0, -1) == [blob]
    assert await streamed_counts(link, keys, ["j"]) == [1]
    assert await redis.ttl(to) > 0


async def test_a_plain_model_still_answers_once_on_the_stream(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    call = stub.ModelStreamInfer(timeout=RPC_TIMEOUT_S)
    a = np.ones((1, 4), np.int64)
    await call.write(infer_request("adder_fixed", {"a": a, "b": a}, request_id="plain"))
    response = await asyncio.wait_for(call.read(), RPC_TIMEOUT_S)
    await call.done_writing()
    assert response.error_message == ""
    assert FINAL not in response.infer_response.parameters
    assert output_arrays(response.infer_response)["sum"].tolist() == [[2] * 4]


@pytest.fixture
async def two_workers(redis: Redis, redis_url: str, generator_repository: Path) -> AsyncIterator[Mesh]:
    mesh = await start_mesh(redis_url, generator_repository, workers=2, worker_overrides={"lease_ms": 600})
    try:
        yield mesh
    finally:
        await stop_mesh(mesh)


async def test_a_worker_lost_mid_generation_ends_the_request_unavailable_with_the_count(two_workers: Mesh) -> None:
    """The generating worker dies (its tasks end, no reply written): its lease lapses,
    the other worker's sweep redelivers the job, and that worker ends it UNAVAILABLE
    with the count of responses sent instead of streaming them again."""
    async with grpc.aio.insecure_channel(two_workers.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        call = stub.ModelStreamInfer(timeout=RPC_TIMEOUT_S)
        await call.write(prompt_request([6], "lost", max_tokens=CEILING))
        await call.read()  # generation is under way somewhere
        generating = [
            server
            for server in two_workers.workers
            for g in server.worker.runner.generators().values()
            if g.task is not None and not g.task.done()
        ]
        assert len(generating) == 1
        crashed = generating[0]
        for g in crashed.worker.runner.generators().values():
            assert g.task is not None
            g.task.cancel()  # as a kill would: nothing more is written for it
        for name in ("serve", "reaper"):
            crashed.tasks[name].cancel()
        tokens, flags, error = await read_request(call, "lost")
        await call.done_writing()
    sent = 1 + len(tokens)
    assert not any(flags)
    assert f"lost after {sent} responses were sent" in error
    assert f"({sent} responses of this request were sent)" in error


async def test_the_bench_generation_point_counts_tokens_and_first_token_times(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    from meshserve_bench.generation import generation_point
    from meshserve_bench.load import Window

    point = await generation_point(stub, 4, Window.after(0.0, 0.5))
    assert point.errors == 0
    assert point.requests > 0
    assert point.tokens_per_s > 0
    assert point.ttft_p50_ms > 0


async def test_a_cancelled_stream_stops_its_generation_on_the_worker(
    mesh: Mesh, stub: pb_grpc.GRPCInferenceServiceStub, redis: Redis
) -> None:
    """A generation of up to 100 000 tokens whose client cancels the stream ends on the
    worker within a few steps (its next partial is refused), and its job is acked."""
    call = stub.ModelStreamInfer(timeout=RPC_TIMEOUT_S)
    await call.write(prompt_request([9], "gone", max_tokens=CEILING))
    await call.read()
    generator = next(iter(mesh.workers[0].worker.runner.generators().values()))
    loop = generator.task
    assert loop is not None
    call.cancel()
    async with asyncio.timeout(10):  # the whole generation would take far longer
        await asyncio.shield(loop)
    assert generator.steps < CEILING
    await mesh.workers[0].worker.leases.flushed()  # the ack is written in the background
    assert await redis.zcard(ModelKeys.for_model("generator", 1).inflight) == 0
