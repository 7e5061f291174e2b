"""Shared fixtures: a real Redis server per session and real example models.

Nothing here imports the generated protos: tests/compat loads tritonclient, whose
`inference.*` protobuf symbols cannot share a process with ours."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
from redis.asyncio import Redis

from meshserve.devkit.examples import write_example_repository
from meshserve.devkit.redis_cluster import RedisCluster
from meshserve.devkit.redis_server import RedisServer, suite_binary_from_env
from meshserve.store.clients import command_link
from meshserve.store.cluster import async_cluster_client, is_cluster_url
from meshserve.store.link import RedisLink


def pytest_configure(config: pytest.Config) -> None:
    # One gRPC asyncio poller for the whole session. Without a reference held, gRPC
    # shuts its global completion queue and poller thread down each time a test drops
    # its last server or channel, and starts them again in the next test: hundreds of
    # shutdowns a run, each racing the poller (grpc/grpc#43364), the likely cause of
    # the segmentation fault once seen in a thread without Python frames. The services
    # hold one too (meshserve/cli/main.py).
    grpc.aio.init_grpc_aio()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A private server for the session: MESHSERVE_TEST_REDIS_BINARY picks one
    (e.g. Debian's redis-server), else the bundled Valkey. MESHSERVE_TEST_REDIS_CLUSTER=1:
    a Redis Cluster of three masters with a replica each instead (a redis+cluster:// URL)."""
    if os.environ.get("MESHSERVE_TEST_REDIS_CLUSTER") == "1":
        with RedisCluster(suite_binary_from_env()) as cluster:
            yield cluster.url
        return
    with RedisServer(suite_binary_from_env()) as server:
        yield server.url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = async_cluster_client(redis_url) if is_cluster_url(redis_url) else Redis.from_url(redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
async def link(redis: Redis, redis_url: str) -> AsyncIterator[RedisLink]:
    """The request path's connection to the same (flushed) server."""
    link = command_link(redis_url)
    yield link
    await link.aclose()


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_example_repository(tmp_path_factory.mktemp("models"))


# The whole mesh in the test's event loop. Imports stay inside the fixtures:
# this file is also loaded by tests/compat, whose process must not load our protos.


@pytest.fixture
async def mesh(redis: Redis, redis_url: str, model_repository: Path) -> AsyncIterator[Any]:
    """Router, gateway and one worker on ephemeral ports, against the session's Redis."""
    from tests.support import start_mesh, stop_mesh

    started = await start_mesh(redis_url, model_repository)
    try:
        yield started
    finally:
        await stop_mesh(started)


@pytest.fixture
async def stub(mesh: Any) -> AsyncIterator[Any]:
    """A GRPCInferenceService stub on a channel to the mesh's gateway."""
    import grpc

    from tests.support import infer_stub

    async with grpc.aio.insecure_channel(mesh.address) as channel:
        yield infer_stub(channel)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``chaos`` (the long chaos run, and a router kill under load) run
    only when selected: ``make chaos`` (pytest -m chaos)."""
    if "chaos" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="marked chaos: `make chaos` (pytest -m chaos)")
    for item in items:
        if item.get_closest_marker("chaos") is not None:
            item.add_marker(skip)
