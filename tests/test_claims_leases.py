"""What docs/reliability.md and docs/errors.md promise about a batch that computes
for longer than a lease, or past its request's deadline, checked on an in-process
mesh serving the "slow" model (tests/slow_model.py) from the session's real Redis.

- A computing batch extends its lease every third of a lease: a batch that runs for
  many leases is not redelivered (no second worker runs it) and answers once; a
  canary that comes due meanwhile waits for the batch without taking the model out.
- A request whose deadline passes while its batch computes is answered
  DEADLINE_EXCEEDED at its deadline, not when the batch ends, and the batch's compute
  is stopped then (every request of it is past its deadline).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from redis.asyncio import Redis

from tests.slow_model import NAME, iterations_for, slow_request_inputs, write_slow
from tests.support import Mesh, infer_request, infer_stub, output_arrays, queue_leftovers, start_mesh, stop_mesh

LEASE_MS = 300
RPC_TIMEOUT_S = 30
WORKER = {"lease_ms": LEASE_MS, "intra_op_threads": 1, "canary_interval_s": 0.2}


@pytest.fixture
async def slow_mesh(redis: Redis, redis_url: str, tmp_path: Path) -> AsyncIterator[Mesh]:
    """Two workers serving "slow": a redelivered batch would run on the idle one."""
    mesh = await start_mesh(redis_url, write_slow(tmp_path), workers=2, worker_overrides=WORKER)
    try:
        yield mesh
    finally:
        await stop_mesh(mesh)


async def all_idle(mesh: Mesh) -> None:
    """Until no worker holds a batch of "slow" (each model's idle event)."""
    async with asyncio.timeout(20):
        for worker in mesh.workers:
            await worker.worker.served[(NAME, 1)].idle.wait()


@pytest.mark.timeout(45)
async def test_a_batch_longer_than_many_leases_is_not_redelivered_and_answers_once(
    slow_mesh: Mesh, redis: Redis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    iterations = iterations_for(2.5, tmp_path)  # about 8 leases
    async with grpc.aio.insecure_channel(slow_mesh.address) as channel:
        request = infer_request(NAME, slow_request_inputs(iterations))
        response = await infer_stub(channel).ModelInfer(request, timeout=RPC_TIMEOUT_S)
    await all_idle(slow_mesh)

    stats = [worker.worker.served[(NAME, 1)].stats for worker in slow_mesh.workers]
    assert output_arrays(response)["done"].tolist() == [[float(iterations)]]
    assert max(s.device_seconds for s in stats) > 3 * LEASE_MS / 1000  # the batch outlived several leases
    assert sum(s.requests for s in stats) == 1  # computed once, by one worker
    assert [s.redelivered for s in stats] == [0, 0]
    assert slow_mesh.gateway.gateway.late_replies == 0
    # Canaries came due every 0.2 s of the batch: they waited for it, and did not take the model out.
    assert not [r.message for r in caplog.records if "canary" in r.message]
    assert await queue_leftovers(redis) == []


@pytest.mark.timeout(45)
async def test_a_deadline_that_passes_while_the_batch_computes_is_answered_at_the_deadline(
    slow_mesh: Mesh, redis: Redis, tmp_path: Path
) -> None:
    iterations = iterations_for(3.0, tmp_path)
    request = infer_request(NAME, slow_request_inputs(iterations), timeout_us=500_000)
    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(slow_mesh.address) as channel:
        started_s = loop.time()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await infer_stub(channel).ModelInfer(request, timeout=RPC_TIMEOUT_S)
        answered_after_s = loop.time() - started_s
    await all_idle(slow_mesh)
    async with asyncio.timeout(10):  # the batch's reply reaches the gateway after the caller has gone
        while slow_mesh.gateway.gateway.late_replies < 1:  # noqa: ASYNC110 (bounded poll: no event for it)
            await asyncio.sleep(0.02)

    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert caught.value.details() == f"deadline exceeded waiting for model '{NAME}'"
    assert answered_after_s < 2.5  # at the 0.5 s deadline, not at the end of a 3 s batch
    stats = [worker.worker.served[(NAME, 1)].stats for worker in slow_mesh.workers]
    assert sum(s.stopped for s in stats) == 1  # its compute ended at the deadline too (nobody waits)
    assert max(s.device_seconds for s in stats) == 0.0  # no batch ran to its end
    assert sum(s.requests for s in stats) == 0
    assert await queue_leftovers(redis) == []
