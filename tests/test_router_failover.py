"""A channel to two routers (the address names both, as Kubernetes' headless Service
does) reaches the leader only, and the new leader once the first one stops."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio import Redis

from gateway.routing import RoutingView
from gateway.server import GatewayServer
from meshserve.devkit.redis_server import free_port
from meshserve.platform.balancing import ROUTER_CHANNEL_OPTIONS
from meshserve.settings import GatewaySettings, RouterSettings, WorkerSettings
from model_workers.server import WorkerServer
from protos import meshserve_pb2 as mpb
from protos import meshserve_pb2_grpc as mpb_grpc
from router.server import RouterServer
from tests.failover import calls_through_a_fault
from tests.support import Mesh
from tests.test_router_leader import LEASE_MS, SERVING, wait_status


async def report(stub: mpb_grpc.RouterStub, worker_id: str, timeout_s: float = 5) -> None:
    request = mpb.WorkerReport(worker_id=worker_id, device="cpu")
    await stub.ReportWorker(request, timeout=timeout_s, wait_for_ready=True)


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


async def test_the_follower_takes_over_when_the_leader_is_killed(redis_url: str, model_repository: Path) -> None:
    """Two router processes; kill -9 of the leader (its lease is not released): the
    other leads once the lease lapses, and a client retrying its call through the
    balancing channel is served there. Prints how long that took."""
    lease_ms = 1000
    ports = [free_port(), free_port()]
    env = dict(os.environ, MESHSERVE_LEADER_LEASE_MS=str(lease_ms))
    routers = [
        await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "meshserve", "router", "--model-repository", str(model_repository)),
            *("--port", str(port), "--redis-url", redis_url),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    try:
        target = ",".join(f"127.0.0.1:{port}" for port in ports)
        async with grpc.aio.insecure_channel(f"ipv4:{target}", options=ROUTER_CHANNEL_OPTIONS) as channel:
            stub = mpb_grpc.RouterStub(channel)
            async with asyncio.timeout(40):
                await report(stub, "before", timeout_s=30)  # the processes start
                leader = await leading_index(ports)
                started_s = time.monotonic()
                routers[leader].kill()
                failed = await report_until_served(stub, "after")
            print(
                f"\nrouter failover after kill -9 (lease {lease_ms} ms): served by the other router"
                f" {time.monotonic() - started_s:.2f} s later, {failed} calls failed meanwhile"
            )
            assert await leading_index(ports) == 1 - leader
    finally:
        for router in routers:
            if router.returncode is None:
                router.kill()
            await router.wait()


async def start_routers(redis_url: str, model_repository: Path, lease_ms: int) -> tuple[list[int], list[Any]]:
    """Two router processes on one Redis (as the manifests' two replicas): their ports
    and processes. The workers report at the routers' default interval (1 s)."""
    ports = [free_port(), free_port()]
    env = dict(os.environ, MESHSERVE_LEADER_LEASE_MS=str(lease_ms))
    routers = [
        await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "meshserve", "router", "--model-repository", str(model_repository)),
            *("--port", str(port), "--redis-url", redis_url),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    return ports, routers


# In `make chaos`, not `make test`: in one full-suite run of five (2026-12-04) the
# pytest process died of a segmentation fault in a thread without Python frames
# (gRPC's poller, or another C thread) during this test; forty runs of it alone, and
# under a second load, did not crash. Until that is understood it runs with the
# long chaos run, where a crash costs no one else's result. Since then the suite and
# the services hold one gRPC asyncio poller for their whole life (tests/conftest.py),
# which takes away the poller shutdowns a known gRPC race lives in; 40 runs of this
# test and 900 server and channel teardowns under load in one process did not crash
# either before or after, so that is a likely cause, not a proven one.
@pytest.mark.chaos
async def test_no_call_is_lost_while_the_leader_router_is_killed_under_load(
    redis_url: str, model_repository: Path
) -> None:
    """A gateway and a worker (in process) reach two router processes through one
    balancing channel, as through the headless Service; clients call in a closed loop
    (tests/failover.py) while the leading router is killed with kill -9. The router is
    off the request path, so no call may fail, hang or get another call's answer,
    while the follower waits out the lease, leads, hears the worker's next report and
    sends the gateway its table. Prints the takeover time (kill to the new leader's
    health SERVING) and the time until the gateway holds the new leader's table."""
    lease_ms = 1000
    ports, routers = await start_routers(redis_url, model_repository, lease_ms)
    target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports)
    gateway = GatewayServer(
        GatewaySettings(lame_duck_s=0.0, redis_url=redis_url, router_address=target, host="127.0.0.1", port=0)
    )
    worker = WorkerServer(
        WorkerSettings(
            intra_op_threads=1, redis_url=redis_url, router_address=target, model_repository=model_repository
        )
    )
    try:
        await gateway.start()
        await worker.start()
        async with asyncio.timeout(40):  # two interpreters start and load the repository
            await gateway.routing.wait_for(RoutingView.all_ready)
        # The routers run apart: the driver reads only the gateway and the workers.
        mesh = Mesh(router=None, gateway=gateway, workers=[worker])  # type: ignore[arg-type]
        timings: dict[str, float] = {}

        async def kill_the_leader() -> float:
            leader = await leading_index(ports)
            old_table = gateway.routing.view
            killed_at = time.monotonic()
            routers[leader].kill()
            async with asyncio.timeout(20):
                while True:
                    with contextlib.suppress(ValueError):  # none leads yet
                        if await leading_index(ports) == 1 - leader:
                            break
                    await asyncio.sleep(0.02)
                timings["takeover"] = time.monotonic() - killed_at
                # the new leader's table, with the model placed again from the worker's report
                await gateway.routing.wait_for(lambda view: view is not old_table and view.all_ready())
                timings["table"] = time.monotonic() - killed_at
            return timings["takeover"]

        tally = await calls_through_a_fault(mesh, kill_the_leader, f"router leader killed (lease {lease_ms} ms)")
        print(
            f"router takeover under load (lease {lease_ms} ms, reports every 1 s): new leader SERVING"
            f" {timings['takeover']:.2f} s after kill -9, the gateway held its table at {timings['table']:.2f} s;"
            f" calls ok {tally.ok}, failed {sum(tally.failed.values())}"
        )
        assert tally.failed == {}, tally.first_failure  # the router is off the request path: nothing failed
        assert gateway.gateway.late_replies == 0
        assert gateway.gateway.lost_jobs == 0
    finally:
        await gateway.stop(grace_s=2)
        await worker.stop()
        for router in routers:
            if router.returncode is None:
                router.kill()
            await router.wait()


async def leading_index(ports: list[int]) -> int:
    """The index of the router whose health "" is SERVING (exactly one)."""
    leading = []
    for i, port in enumerate(ports):
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.aio.AioRpcError:
            continue  # the killed one
        if reply.status == SERVING:
            leading.append(i)
    [index] = leading
    return index


async def report_until_served(stub: mpb_grpc.RouterStub, worker_id: str) -> int:
    """Retry as a worker's reporter does: a call in flight on the dead connection fails
    UNAVAILABLE; the next ones wait for a SERVING router. How many failed."""
    failed = 0
    while True:
        try:
            await report(stub, worker_id)
            return failed
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:  # anything else is not the failover
                raise
            failed += 1
            await asyncio.sleep(0.05)
