"""What docs/reliability.md promises about a worker that dies or is stopped in the
middle of a batch, checked on worker processes (``python -m meshserve worker``)
against an in-process router and gateway and the session's real Redis.

- A request whose worker dies on it every time is answered
  ``INTERNAL: model 'x' crashed on this input 3 times`` (``--max-attempts``), not
  left to its deadline and not run by worker after worker.
- SIGTERM to a worker that is computing a batch: it finishes the batch, the caller
  gets its result, the lease is acked, the process exits 0.

The "slow" model (tests/slow_model.py) makes "mid-batch" a window of seconds; each
kill or signal goes out once Redis shows the job claimed (its attempt count).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from redis.asyncio import Redis

from gateway.server import GatewayServer
from meshserve.queue import ModelKeys
from meshserve.settings import GatewaySettings, RouterSettings
from router.server import RouterServer
from tests.slow_model import NAME, iterations_for, slow_request_inputs, write_slow
from tests.support import infer_request, infer_stub, output_arrays, queue_leftovers

SLOW = ModelKeys.for_model(NAME, 1)
LEASE_MS = 500
RPC_TIMEOUT_S = 40
POLL_S = 0.02


@dataclass
class ControlPlane:
    """Router and gateway in the test's loop; workers as processes, started on demand."""

    redis_url: str
    repository: Path
    logs: Path
    router: RouterServer
    gateway: GatewayServer
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start_worker(self) -> subprocess.Popen[bytes]:
        args = ["--redis-url", self.redis_url, "--router", self.router.address]
        args += ["--model-repository", str(self.repository), "--lease-ms", str(LEASE_MS)]
        args += ["--intra-op-threads", "1", "--health-host", "127.0.0.1", "--canary-interval-s", "0"]
        log = (self.logs / f"worker-{len(self.workers)}.log").open("wb")
        with log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "meshserve", "worker", *args], stdin=subprocess.DEVNULL, stderr=log
            )
        self.workers.append(worker)
        return worker

    def log_of(self, index: int) -> str:
        return (self.logs / f"worker-{index}.log").read_text(errors="replace")


@pytest.fixture
async def plane(redis: Redis, redis_url: str, tmp_path: Path) -> AsyncIterator[ControlPlane]:
    repository = write_slow(tmp_path / "models")
    (tmp_path / "logs").mkdir()
    router = RouterServer(
        RouterSettings(model_repository=repository, port=0, report_interval_ms=200, redis_url=redis_url)
    )
    await router.start()
    gateway = GatewayServer(
        GatewaySettings(lame_duck_s=0.0, redis_url=redis_url, router_address=router.address, host="127.0.0.1", port=0)
    )
    await gateway.start()
    plane = ControlPlane(redis_url, repository, tmp_path / "logs", router, gateway)
    try:
        yield plane
    finally:
        for worker in plane.workers:
            if worker.poll() is None:
                worker.kill()
            worker.wait()
        await gateway.stop(grace_s=0)
        await router.stop()


async def wait_model_ready(plane: ControlPlane) -> None:
    async with asyncio.timeout(30):
        await plane.gateway.routing.wait_for(lambda view: (NAME, 1) in view.ready)


async def only_job_id(plane: ControlPlane) -> str:
    """The id of the one request the gateway waits for (polled, bounded)."""
    async with asyncio.timeout(10):
        while not plane.gateway.gateway.pending:  # noqa: ASYNC110 (bounded poll: no event for it)
            await asyncio.sleep(POLL_S)
    (job_id,) = plane.gateway.gateway.pending
    return job_id


async def wait_attempt(redis: Redis, job_id: str, attempt: int, timeout_s: float = 30) -> None:
    """Until the job has been claimed ``attempt`` times (the claim counts it in the job hash)."""
    async with asyncio.timeout(timeout_s):
        while int(await redis.hget(SLOW.job(job_id), "a") or 0) < attempt:  # noqa: ASYNC110 (bounded poll)
            await asyncio.sleep(POLL_S)


@pytest.mark.timeout(60)
async def test_a_request_its_workers_die_on_three_times_is_answered_internal(plane: ControlPlane, redis: Redis) -> None:
    iterations = iterations_for(5.0, plane.repository)  # far longer than a claim-to-kill
    first = plane.start_worker()
    await wait_model_ready(plane)
    async with grpc.aio.insecure_channel(plane.gateway.address) as channel:
        call = asyncio.ensure_future(
            infer_stub(channel).ModelInfer(infer_request(NAME, slow_request_inputs(iterations)), timeout=RPC_TIMEOUT_S)
        )
        job_id = await only_job_id(plane)
        worker = first
        for attempt in (1, 2, 3):
            await wait_attempt(redis, job_id, attempt)
            assert not call.done()
            worker.send_signal(signal.SIGKILL)  # a crash in the middle of the batch
            worker.wait()
            worker = plane.start_worker()  # reaps the expired lease: claims it again, or answers it
        async with asyncio.timeout(RPC_TIMEOUT_S):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call

    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert caught.value.details() == f"model '{NAME}' crashed on this input 3 times"
    assert int(await redis.hget(SLOW.job(job_id), "a") or 0) == 0  # the job is gone, not claimed a 4th time
    assert await queue_leftovers(redis) == []
    assert worker.poll() is None  # the fourth worker answered it and lives on


@pytest.mark.timeout(45)
async def test_sigterm_to_a_computing_worker_finishes_the_batch_and_acks_it(plane: ControlPlane, redis: Redis) -> None:
    iterations = iterations_for(2.0, plane.repository)
    worker = plane.start_worker()
    await wait_model_ready(plane)
    async with grpc.aio.insecure_channel(plane.gateway.address) as channel:
        call = asyncio.ensure_future(
            infer_stub(channel).ModelInfer(infer_request(NAME, slow_request_inputs(iterations)), timeout=RPC_TIMEOUT_S)
        )
        job_id = await only_job_id(plane)
        await wait_attempt(redis, job_id, 1)
        assert not call.done()
        worker.send_signal(signal.SIGTERM)
        async with asyncio.timeout(RPC_TIMEOUT_S):
            response = await call
    code = await asyncio.to_thread(worker.wait, 20)

    assert output_arrays(response)["done"].tolist() == [[float(iterations)]]
    assert code == 0, plane.log_of(0)
    assert await redis.zcard(SLOW.inflight) == 0  # acked, not left for the reaper
    assert await queue_leftovers(redis) == []
    assert "released" not in plane.log_of(0)  # it ran the batch it held, gave nothing back
