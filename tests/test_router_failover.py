"""A channel to two routers (the address names both, as Kubernetes' headless Service
does) reaches the leader only, and the new leader once the first one stops."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from redis.asyncio import Redis

from meshserve.platform.balancing import ROUTER_CHANNEL_OPTIONS
from meshserve.settings import RouterSettings
from protos import meshserve_pb2 as mpb
from protos import meshserve_pb2_grpc as mpb_grpc
from router.server import RouterServer
from tests.test_router_leader import LEASE_MS, SERVING, wait_status


async def report(stub: mpb_grpc.RouterStub, worker_id: str) -> None:
    await stub.ReportWorker(mpb.WorkerReport(worker_id=worker_id, device="cpu"), timeout=5, wait_for_ready=True)


async def test_calls_go_to_the_leader_and_follow_the_lease(
    redis: Redis, redis_url: str, model_repository: Path
) -> None:
    settings = RouterSettings(model_repository=model_repository, port=0, redis_url=redis_url, leader_lease_ms=LEASE_MS)
    first = RouterServer(settings, on_deposed=lambda: None)
    await first.start()
    await wait_status(first, SERVING)
    second = RouterServer(settings, on_deposed=lambda: None)
    await second.start()
    try:
        target = f"ipv4:127.0.0.1:{first.port},127.0.0.1:{second.port}"
        async with grpc.aio.insecure_channel(target, options=ROUTER_CHANNEL_OPTIONS) as channel:
            stub = mpb_grpc.RouterStub(channel)
            for i in range(6):  # round robin would alternate, were the follower ready
                await report(stub, f"w{i}")
            assert sorted(first.core.workers) == [f"w{i}" for i in range(6)]
            assert not second.core.workers

            await first.stop()
            async with asyncio.timeout(10):
                await report(stub, "after")  # waits for the second to lead
            assert "after" in second.core.workers
    finally:
        await second.stop()
        await first.stop()
