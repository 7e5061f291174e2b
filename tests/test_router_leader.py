"""Two routers on one Redis (router/leader.py): one leads, the other takes over when
the leader stops, and a leader whose lease is taken steps down."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio import Redis

from meshserve.models.repository import load_model
from meshserve.settings import RouterSettings
from router.core import RouterCore
from router.leader import LEADER_KEY
from router.scaler import SCALER_SERVICE_NAME
from router.server import RouterServer

LEASE_MS = 600
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def wait_status(router: RouterServer, status: int, service: str = "") -> None:
    """Until health ``service`` reports ``status`` (a Watch stream: each change is pushed)."""
    async with grpc.aio.insecure_channel(router.address) as channel:
        async with asyncio.timeout(5):
            request = health_pb2.HealthCheckRequest(service=service)
            async for reply in health_pb2_grpc.HealthStub(channel).Watch(request):
                if reply.status == status:
                    return


class Deposed:
    def __init__(self) -> None:
        self.event = asyncio.Event()

    def __call__(self) -> None:
        self.event.set()


@pytest.fixture
async def routers(
    redis: Redis, redis_url: str, model_repository: Path
) -> AsyncIterator[list[tuple[RouterServer, Deposed]]]:
    started = []
    for _ in range(2):
        deposed = Deposed()
        settings = RouterSettings(
            model_repository=model_repository, port=0, redis_url=redis_url, leader_lease_ms=LEASE_MS
        )
        router = RouterServer(settings, on_deposed=deposed)
        await router.start()
        started.append((router, deposed))
        if len(started) == 1:
            await wait_status(router, SERVING)  # the first one leads before the second starts
    yield started
    for router, _ in started:
        await router.stop()


async def test_one_router_leads_and_the_other_takes_over_when_it_stops(
    routers: list[tuple[RouterServer, Deposed]],
) -> None:
    (first, first_deposed), (second, _) = routers
    await wait_status(second, NOT_SERVING)
    assert first.leadership is not None
    assert first.leadership.leading
    assert second.leadership is not None
    assert not second.leadership.leading

    for router in (first, second):  # what Kubernetes probes: every replica is ready, leader or not
        await wait_status(router, SERVING, SCALER_SERVICE_NAME)

    await first.stop()  # releases the lease: the second takes it at its next try
    await wait_status(second, SERVING)
    assert second.leadership.leading
    assert not first_deposed.event.is_set()  # stepping down on purpose is not being deposed


async def test_a_leader_whose_lease_is_taken_steps_down(
    routers: list[tuple[RouterServer, Deposed]], redis: Redis
) -> None:
    (first, first_deposed), (second, _) = routers
    await redis.set(LEADER_KEY, "another-router", px=LEASE_MS * 10)  # as if the lease had lapsed and been won
    async with asyncio.timeout(5):
        await first_deposed.event.wait()
    await wait_status(first, NOT_SERVING)
    assert second.leadership is not None
    assert not second.leadership.leading


def test_an_election_needs_redis(model_repository: Path) -> None:
    with pytest.raises(ValueError, match="--redis-url"):
        RouterServer(RouterSettings(model_repository=model_repository, port=0, leader_lease_ms=LEASE_MS))


async def test_a_new_leaders_tables_wait_for_the_workers_reports_a_bounded_while(model_repository: Path) -> None:
    """A router that has just taken the lease knows no worker: its tables would say
    every model is not ready, and gateways would refuse calls they could queue. For a
    while (``hold_unready_tables``) it gives none in which a model is not ready; the
    first table after a worker's report places the model again goes at once."""
    mlp = ("mlp", 1)
    core = RouterCore([load_model(model_repository / "mlp", 1)])
    core.hold_unready_tables(60)  # far longer than this test: only readiness ends it
    tables = core.watch()
    first = asyncio.ensure_future(anext(tables))
    await core.report("w1", "cpu", set(), draining=False)  # placed there, loading: a new, unready generation
    for _ in range(20):  # let the watch see it (loop turns, no clock)
        await asyncio.sleep(0)
    assert not first.done()
    await core.report("w1", "cpu", {mlp}, draining=False)
    async with asyncio.timeout(5):
        assert mlp in (await first).ready

    # Once the hold is over, an unready table goes as any other.
    core.hold_unready_tables(0.05)
    await core.report("w1", "cpu", set(), draining=False)
    async with asyncio.timeout(5):
        assert mlp not in (await anext(tables)).ready
