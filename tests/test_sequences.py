"""Sequences (stateful models) over the whole mesh: state in Redis, steps of one
sequence one at a time, any worker running the next step, a worker that dies
mid-step losing nothing, the idle timeout, caps, tenants kept apart, and sequence
parameters refused by a stateless model.

The model is the accumulator (meshserve/devkit/accumulator.py): each step adds its
``x`` to the sequence's running sum, so a lost or doubled step shows in the sum."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from redis.asyncio import Redis

from meshserve.devkit.accumulator import write_accumulator
from meshserve.devkit.examples import write_example_repository
from meshserve.queue import ModelKeys, QueueProtocol
from meshserve.queue.keys import SequenceKeys, sequence_member
from meshserve.queue.sequences import WRITE_STATE, StepWrite, seq_reply_ack_command
from meshserve.store.link import RedisLink
from meshserve.tenancy.tenants import hash_key
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from protos import model_config_pb2 as mc
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
LEASE_MS = 1500

TENANTS = f"""
tenants:
  - name: acme
    api_keys: ["{hash_key("acme-key")}"]
    models: ["*"]
  - name: globex
    api_keys: ["{hash_key("globex-key")}"]
    models: ["*"]
"""


def auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def step(
    value: int, sequence_id: int | str, *, start: bool = False, end: bool = False, model: str = "accumulator"
) -> pb.ModelInferRequest:
    request = infer_request(model, {"x": np.array([[value]], np.int64)}, outputs=["sum", "started", "corrid"])
    if isinstance(sequence_id, str):
        request.parameters["sequence_id"].string_param = sequence_id
    else:
        request.parameters["sequence_id"].int64_param = sequence_id
    request.parameters["sequence_start"].bool_param = start
    request.parameters["sequence_end"].bool_param = end
    return request


async def total(stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest, **kwargs: Any) -> int:
    response = await stub.ModelInfer(request, timeout=RPC_TIMEOUT_S, **kwargs)
    return int(output_arrays(response)["sum"][0, 0])


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_example_repository(tmp_path_factory.mktemp("seq"), ["adder_fixed"])
    write_accumulator(root)
    write_accumulator(root, "short_lived", idle_timeout_s=0.3)
    write_accumulator(root, "capped", max_sequences=2, max_sequences_per_tenant=1)
    return root


@pytest.fixture
async def mesh(redis: Redis, redis_url: str, repository: Path, tmp_path: Path) -> AsyncIterator[Mesh]:
    path = tmp_path / "tenants.yaml"
    path.write_text(TENANTS)
    started = await start_mesh(
        redis_url, repository, workers=2, tenants_path=path, worker_overrides={"lease_ms": LEASE_MS}
    )
    try:
        yield started
    finally:
        await stop_mesh(started)


@pytest.fixture
async def stub(mesh: Mesh) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        yield infer_stub(channel)


ACME = auth("acme-key")
GLOBEX = auth("globex-key")


async def test_a_sequence_accumulates_and_the_worker_feeds_its_controls(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    first = await stub.ModelInfer(step(5, 42, start=True), timeout=RPC_TIMEOUT_S, metadata=ACME)
    got = output_arrays(first)
    assert (got["sum"][0, 0], got["started"][0, 0], got["corrid"][0, 0]) == (5, 1, 42)
    second = output_arrays(await stub.ModelInfer(step(7, 42), timeout=RPC_TIMEOUT_S, metadata=ACME))
    assert (second["sum"][0, 0], second["started"][0, 0]) == (12, 0)
    assert await total(stub, step(1, 42, end=True), metadata=ACME) == 13
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await stub.ModelInfer(step(1, 42), timeout=RPC_TIMEOUT_S, metadata=ACME)
    assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sequence 42 of model 'accumulator' is not live" in (ended.value.details() or "")


async def test_a_hundred_interleaved_sequences_over_two_workers_give_exact_sums(
    mesh: Mesh, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    """Each sequence sends its steps one after the other; the hundred run at once, so
    steps of different sequences share batches and both workers."""
    steps = 6
    rng = random.Random(7)
    values = {seq: [rng.randrange(1, 1000) for _ in range(steps)] for seq in range(1, 101)}

    async def run(seq: int) -> list[int]:
        sums = []
        for i, value in enumerate(values[seq]):
            request = step(value, f"s-{seq}" if seq % 2 else seq, start=i == 0, end=i == steps - 1)
            sums.append(await total(stub, request, metadata=ACME))
        return sums

    results = await asyncio.gather(*(run(seq) for seq in values))
    for seq, sums in zip(values, results, strict=True):
        assert sums == list(np.cumsum(values[seq])), f"sequence {seq}"
    stats = [w.worker.served[("accumulator", 1)].stats for w in mesh.workers]
    assert all(s.requests > 0 for s in stats), "both workers ran steps"
    assert max(s.largest_batch for s in stats) > 1, "steps of different sequences batched"


async def test_steps_sent_at_once_run_one_at_a_time_in_order(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    """Steps of one sequence queued together: each sees the state of the one before."""
    await total(stub, step(0, 9, start=True), metadata=ACME)
    calls = []
    for value in range(1, 21):
        calls.append(asyncio.ensure_future(total(stub, step(value, 9), metadata=ACME)))
        await asyncio.sleep(0)  # let each call leave before the next: arrival order is queue order
    sums = await asyncio.gather(*calls)
    assert sorted(sums) == list(np.cumsum(range(1, 21)))


async def test_a_later_step_sent_at_a_higher_priority_does_not_overtake_an_earlier_one(
    mesh: Mesh, stub: pb_grpc.GRPCInferenceServiceStub, redis: Redis
) -> None:
    """A sequence started at the lowest tier: its next step, also low, and the one after
    it at the tenant's standard tier (which a stateless call would take first) queue
    together; each runs on the state of the step before it, in arrival order, because
    every step takes its start step's tier (kept with the sequence's state)."""
    first = step(1, 88, start=True)
    first.parameters["priority"].int64_param = 3  # the lowest tier
    assert await total(stub, first, metadata=ACME) == 1
    for worker in mesh.workers:
        await hold_serving(worker)
    low = step(10, 88)
    low.parameters["priority"].int64_param = 3
    second = asyncio.ensure_future(total(stub, low, metadata=ACME))
    await wait_queued(redis, "accumulator", 1)
    third = asyncio.ensure_future(total(stub, step(100, 88), metadata=ACME))  # no priority: standard
    await wait_queued(redis, "accumulator", 2)
    for worker in mesh.workers:
        release_serving(worker)
    assert await second == 11
    assert await third == 111


async def test_a_step_whose_worker_dies_mid_step_is_redelivered_against_the_state_before_it(
    mesh: Mesh, stub: pb_grpc.GRPCInferenceServiceStub, redis: Redis, redis_url: str
) -> None:
    """A "worker" claims the step and dies (never replies, never acks): its lease runs
    out, the reaper redelivers, a live worker runs it on the state from before it."""
    assert await total(stub, step(10, 77, start=True), metadata=ACME) == 10
    for worker in mesh.workers:
        await hold_serving(worker)
    keys = ModelKeys.for_model("accumulator", 1)
    call = asyncio.ensure_future(total(stub, step(5, 77), metadata=ACME))
    await wait_queued(redis, "accumulator", 1)
    link = RedisLink(redis_url)
    try:
        queue = QueueProtocol(link)
        dead = await queue.claim(
            keys,
            max_items=8,
            lease_ms=300,
            worker_id="doomed",
            sequence_prefix=SequenceKeys.of(keys).state_prefix,
            sequence_idle_ms=60_000,
        )
        assert len(dead.jobs) == 1
        job_id = dead.jobs[0][0]
        assert dead.steps[job_id].state == np.array([10], np.int64).tobytes()
        for worker in mesh.workers:
            release_serving(worker)
        assert await call == 15  # redelivered and applied once, on 10
        # The "dead" worker wakes up and answers with its stale lease: no state changes.
        zombie = seq_reply_ack_command(
            keys,
            SequenceKeys.of(keys),
            60_000,
            "ms:{g:zombie}:replies",
            [b"stale"],
            [StepWrite(dead.token, job_id, WRITE_STATE, np.array([999], np.int64).tobytes())],
        )
        assert await link.pipeline([zombie]) == [0]  # nothing acked
    finally:
        await link.aclose()
    assert await total(stub, step(1, 77, end=True), metadata=ACME) == 16


async def test_an_idle_sequence_is_freed_and_its_next_step_names_the_timeout(
    stub: pb_grpc.GRPCInferenceServiceStub, redis: Redis
) -> None:
    member = sequence_member("acme", "i5")
    key = SequenceKeys.for_model("short_lived", 1).state(member)
    await redis.config_set("notify-keyspace-events", "Ex")
    async with redis.pubsub() as events:
        await events.subscribe("__keyevent@0__:expired")
        assert await total(stub, step(3, 5, start=True, model="short_lived"), metadata=ACME) == 3
        assert 0 < await redis.pttl(key) <= 300
        async with asyncio.timeout(5):  # Redis expires it on its own clock, and says so
            async for event in events.listen():
                if event["type"] == "message" and event["data"] == key.encode():
                    break
    with pytest.raises(grpc.aio.AioRpcError) as idle:
        await stub.ModelInfer(step(1, 5, model="short_lived"), timeout=RPC_TIMEOUT_S, metadata=ACME)
    assert idle.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sequence.idle_timeout_s: 0.3" in (idle.value.details() or "")
    assert await total(stub, step(4, 5, start=True, model="short_lived"), metadata=ACME) == 4


async def test_two_tenants_with_the_same_sequence_id_never_share_state(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    assert await total(stub, step(100, 1, start=True), metadata=ACME) == 100
    assert await total(stub, step(1, 1, start=True), metadata=GLOBEX) == 1
    assert await total(stub, step(100, 1), metadata=ACME) == 200
    assert await total(stub, step(1, 1), metadata=GLOBEX) == 2
    with pytest.raises(grpc.aio.AioRpcError) as other:
        await stub.ModelInfer(step(1, 2), timeout=RPC_TIMEOUT_S, metadata=GLOBEX)
    assert other.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_live_sequences_are_capped_per_model_and_per_tenant(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    assert await total(stub, step(1, 1, start=True, model="capped"), metadata=ACME) == 1
    with pytest.raises(grpc.aio.AioRpcError) as mine:
        await stub.ModelInfer(step(1, 2, start=True, model="capped"), timeout=RPC_TIMEOUT_S, metadata=ACME)
    assert mine.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "sequence.max_sequences_per_tenant" in (mine.value.details() or "")
    assert await total(stub, step(1, 1, start=True, model="capped"), metadata=GLOBEX) == 1
    with pytest.raises(grpc.aio.AioRpcError) as model:
        await stub.ModelInfer(step(1, 3, start=True, model="capped"), timeout=RPC_TIMEOUT_S, metadata=GLOBEX)
    assert "sequence.max_sequences" in (model.value.details() or "")
    assert await total(stub, step(1, 1, end=True, model="capped"), metadata=ACME) == 2  # frees acme's
    assert await total(stub, step(1, 2, start=True, model="capped"), metadata=ACME) == 1


async def test_a_sequence_id_sent_to_a_stateless_model_is_refused(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = infer_request("adder_fixed", {"a": np.ones((1, 4), np.int64), "b": np.ones((1, 4), np.int64)})
    request.parameters["sequence_id"].int64_param = 3
    request.parameters["sequence_start"].bool_param = True
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ModelInfer(request, timeout=RPC_TIMEOUT_S, metadata=ACME)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model 'adder_fixed' has no sequence: section" in (refused.value.details() or "")


async def test_a_sequence_model_needs_a_sequence_id(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = infer_request("accumulator", {"x": np.ones((1, 1), np.int64)})
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ModelInfer(request, timeout=RPC_TIMEOUT_S, metadata=ACME)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'sequence_id'" in (refused.value.details() or "")


async def test_steps_over_model_stream_infer(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    call = stub.ModelStreamInfer(timeout=RPC_TIMEOUT_S, metadata=ACME)
    sums = []
    for i, value in enumerate([2, 3, 4]):
        await call.write(step(value, "streamed", start=i == 0, end=i == 2))
        response = await call.read()
        assert response.error_message == ""
        sums.append(int(output_arrays(response.infer_response)["sum"][0, 0]))
    await call.done_writing()
    assert sums == [2, 5, 9]


async def test_model_config_reports_sequence_batching(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    config = (
        await stub.ModelConfig(pb.ModelConfigRequest(name="short_lived"), timeout=RPC_TIMEOUT_S, metadata=ACME)
    ).config
    batching = config.sequence_batching
    assert batching.max_sequence_idle_microseconds == 300_000
    controls = {c.name: c.control[0] for c in batching.control_input}
    assert list(controls["START"].int32_false_true) == [0, 1]
    assert controls["CORRID"].data_type == mc.TYPE_INT64
    (state,) = batching.state
    assert (state.input_name, state.output_name, list(state.dims)) == ("state_in", "state_out", [1])
    assert state.initial_state[0].zero_data
    assert [i.name for i in config.input] == ["x"]  # the worker feeds the rest


async def test_a_step_left_queued_holds_back_the_later_steps_of_its_sequence(link: RedisLink, redis: Redis) -> None:
    """At the queue: a sequence's first step has another shape than the batch a claim
    fills; its second step, of the batch's shape, must still wait for it."""
    queue = QueueProtocol(link)
    keys = ModelKeys.for_model("seq_order", 1)
    member = sequence_member("t", "i1")
    await redis.hset(SequenceKeys.of(keys).state(member), "v", b"")  # live (as SEQ_ADMIT leaves it)
    far_ms = 2**42
    for job_id, signature, flags in (("first", "a", "s"), ("second", "b", "")):
        enqueued = await queue.enqueue(
            keys,
            job_id,
            tier=1,
            payload=b"p",
            deadline_ms=far_ms,
            tenant="t",
            reply_to="replies",
            signature=signature,
            max_queue_size=0,
            step=(member, flags),
        )
        assert enqueued.code == 1
    options: dict[str, Any] = {
        "max_items": 8,
        "lease_ms": 60_000,
        "worker_id": "w",
        "sequence_prefix": SequenceKeys.of(keys).state_prefix,
        "sequence_idle_ms": 60_000,
    }
    assert (await queue.claim(keys, signature="b", **options)).jobs == []
    taken = await queue.claim(keys, **options)
    assert [job_id for job_id, _ in taken.jobs] == ["first"]
    assert taken.steps["first"].state == b""
    assert (await queue.claim(keys, **options)).jobs == []  # its turn is not over


async def test_the_sequences_bench_point_against_the_mesh(mesh: Mesh) -> None:
    """The bench scenario's step loop (meshserve_bench/sequences.py), briefly: steps
    counted, none failed."""
    from meshserve_bench import sequences
    from meshserve_bench.load import Window

    async with grpc.aio.insecure_channel(mesh.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        point = await sequences.point(stub, "step", 2, Window.after(0.0, 0.3), metadata=ACME)
    assert point.calls.ok > 0
    assert point.calls.errors == {}
