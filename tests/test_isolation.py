"""One model cannot hurt another, and time limits (issue 16, seen 3 and 4; docs/models.md
"Timeouts and instances", docs/reliability.md), on an in-process mesh from the
session's real Redis serving the "slow" model (tests/slow_model.py) and the example
"mlp" on one worker.

- While "slow" computes for seconds, "mlp" on the same worker answers every call,
  and neither model's readiness changes (its canaries keep coming due).
- A batch past the model's execution timeout is stopped, answered UNAVAILABLE
  naming the model and the limit, and the worker goes on.
- After one slow batch, a call whose deadline is shorter than that batch is still
  tried (the shedding estimate is not a lockout) and the estimate comes down.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from redis.asyncio import Redis

from meshserve.devkit.examples import write_example_repository
from meshserve.queue import ModelKeys
from model_workers.served import Served
from tests.slow_model import NAME, iterations_for, slow_request_inputs, write_slow
from tests.support import Mesh, infer_request, infer_stub, output_arrays, start_mesh, stop_mesh

FAST = "mlp"
SLOW = ModelKeys.for_model(NAME, 1)
RPC_TIMEOUT_S = 30
WORKER = {"lease_ms": 300, "canary_timeout_ms": 300, "intra_op_threads": 1, "canary_interval_s": 0.2}


async def mesh_of(redis_url: str, repository: Path) -> AsyncIterator[Mesh]:
    mesh = await start_mesh(redis_url, write_example_repository(repository, [FAST]), worker_overrides=WORKER)
    try:
        yield mesh
    finally:
        await stop_mesh(mesh)


@pytest.fixture
async def two_models(redis: Redis, redis_url: str, tmp_path: Path) -> AsyncIterator[Mesh]:
    """ "slow" (its execution timeout raised above the test's batches) and "mlp", one worker."""
    async for mesh in mesh_of(redis_url, write_slow(tmp_path, "max_batch_size: 4\nexecution_timeout_ms: 20000\n")):
        yield mesh


def slow_served(mesh: Mesh) -> Served:
    return mesh.workers[0].worker.served[(NAME, 1)]


async def wait_computing(redis: Redis) -> None:
    """Until a batch of "slow" is leased (computing)."""
    async with asyncio.timeout(10):
        while await redis.zcard(SLOW.inflight) == 0:  # noqa: ASYNC110 (bounded poll: no event for it)
            await asyncio.sleep(0.01)


def percentile_ms(latencies_s: list[float], q: float) -> float:
    return float(np.percentile(np.array(latencies_s) * 1000, q))


@pytest.mark.timeout(55)
async def test_a_slow_model_does_not_starve_a_fast_one_on_the_same_worker(
    two_models: Mesh, redis: Redis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    worker = two_models.workers[0].worker
    iterations = iterations_for(6.0, tmp_path)
    fast_request = infer_request(FAST, {"features": np.ones((1, 64), np.float32)})
    readiness = worker.readiness()
    assert all(readiness.values())
    async with grpc.aio.insecure_channel(two_models.address) as channel:
        stub = infer_stub(channel)
        alone_s: list[float] = []
        for _ in range(50):
            started_s = time.perf_counter()
            await stub.ModelInfer(fast_request, timeout=2)
            alone_s.append(time.perf_counter() - started_s)

        slow_call = asyncio.ensure_future(
            stub.ModelInfer(infer_request(NAME, slow_request_inputs(iterations)), timeout=RPC_TIMEOUT_S)
        )
        await wait_computing(redis)
        during_s: list[float] = []
        readiness_seen = []
        while not slow_call.done():
            started_s = time.perf_counter()
            await stub.ModelInfer(fast_request, timeout=2)  # a failure fails the test
            during_s.append(time.perf_counter() - started_s)
            readiness_seen.append(worker.readiness())
        slow_reply = await slow_call

    assert output_arrays(slow_reply)["done"].tolist() == [[float(iterations)]]
    assert len(during_s) > 10  # the fast model answered all along
    assert all(seen == readiness for seen in readiness_seen)  # no readiness change, either model
    assert not [r.message for r in caplog.records if "canary" in r.message]
    print(
        f"\nfast model p50/p99 alone {percentile_ms(alone_s, 50):.2f}/{percentile_ms(alone_s, 99):.2f} ms,"
        f" beside a {slow_served(two_models).stats.device_seconds:.1f} s batch"
        f" {percentile_ms(during_s, 50):.2f}/{percentile_ms(during_s, 99):.2f} ms ({len(during_s)} calls)"
    )


@pytest.mark.timeout(45)
async def test_a_batch_past_the_execution_timeout_is_stopped_and_the_worker_goes_on(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    repository = write_slow(tmp_path, "max_batch_size: 4\nexecution_timeout_ms: 400\n")
    iterations = iterations_for(5.0, repository)
    async for mesh in mesh_of(redis_url, repository):
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ModelInfer(infer_request(NAME, slow_request_inputs(iterations)), timeout=RPC_TIMEOUT_S)
            quick = await stub.ModelInfer(infer_request(NAME, slow_request_inputs(1)), timeout=RPC_TIMEOUT_S)
        stats = slow_served(mesh).stats
        ready = mesh.workers[0].worker.readiness()

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert caught.value.details() == (
        f"model '{NAME}' stopped at its execution timeout of 400 ms (config.yaml execution_timeout_ms)"
    )
    assert output_arrays(quick)["done"].tolist() == [[1.0]]
    assert stats.stopped == 1
    assert stats.device_seconds < 5.0  # the one batch that ran to the end was the quick one
    assert all(ready.values())


@pytest.mark.timeout(45)
async def test_after_one_slow_batch_a_call_with_a_shorter_deadline_is_still_tried(
    two_models: Mesh, tmp_path: Path
) -> None:
    """Seen 3, scaled down: a 32 s batch once, then every 30 s-capped call shed in 3 ms,
    for good. Here a batch of about 2.5 s, then calls whose timeout is under it."""
    iterations = iterations_for(2.5, tmp_path)
    served = slow_served(two_models)
    async with grpc.aio.insecure_channel(two_models.address) as channel:
        stub = infer_stub(channel)
        await stub.ModelInfer(infer_request(NAME, slow_request_inputs(iterations)), timeout=RPC_TIMEOUT_S)
        estimate_after_slow_ms = served.batch_ms()
        # shorter than the estimate, so a claim that trusts it sheds every call; taken
        # from the measured batch, not the calibration, which a loaded machine skews
        timeout_s = 0.6 * estimate_after_slow_ms / 1000
        assert timeout_s > 0.5, f"the slow batch took {estimate_after_slow_ms} ms: too quick to tell"
        replies = [
            await stub.ModelInfer(infer_request(NAME, slow_request_inputs(1)), timeout=timeout_s) for _ in range(10)
        ]

    assert [output_arrays(r)["done"].tolist() for r in replies] == [[[1.0]]] * 10
    assert served.batch_ms() < estimate_after_slow_ms / 4  # it follows the recent past
    assert served.stats.expired == 0


@pytest.mark.timeout(45)
async def test_instances_let_batches_of_one_model_compute_at_once(redis: Redis, redis_url: str, tmp_path: Path) -> None:
    repository = write_slow(tmp_path, "max_batch_size: 1\ninstances: 2\nexecution_timeout_ms: 20000\n")
    iterations = iterations_for(2.0, repository)
    async for mesh in mesh_of(redis_url, repository):
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            calls = [
                asyncio.ensure_future(
                    stub.ModelInfer(infer_request(NAME, slow_request_inputs(iterations)), timeout=RPC_TIMEOUT_S)
                )
                for _ in range(2)
            ]
            async with asyncio.timeout(10):  # both leased at once: two batches computing
                while await redis.zcard(SLOW.inflight) < 2:  # noqa: ASYNC110 (bounded poll: no event for it)
                    await asyncio.sleep(0.01)
            replies = await asyncio.gather(*calls)
        batches = slow_served(mesh).stats.batches

    assert [output_arrays(r)["done"].tolist() for r in replies] == [[[float(iterations)]]] * 2
    assert batches == 2
