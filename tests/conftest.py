"""Shared fixtures: a real Redis server per session and real example models.

Nothing here imports the generated protos: tests/compat loads tritonclient, whose
`inference.*` protobuf symbols cannot share a process with ours."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from meshserve.examples import write_example_repository
from meshserve.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A private server for the session: MESHSERVE_TEST_REDIS_BINARY picks one
    (e.g. Debian's redis-server), else the bundled Valkey."""
    with RedisServer(os.environ.get("MESHSERVE_TEST_REDIS_BINARY") or None) as server:
        yield server.url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_example_repository(tmp_path_factory.mktemp("models"))
