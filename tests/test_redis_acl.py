"""The mesh against a Redis that requires AUTH with an ACL user confined to meshserve's
keys (``ms:*``): credentials travel in --redis-url, and every key the mesh touches,
its scripts included, lives under the prefix an operator grants."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import grpc
import numpy as np
import pytest
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, NoPermissionError

from tests.support import infer_request, infer_stub, output_arrays, start_mesh, stop_mesh

USER, PASSWORD = "meshserve", "s3cret-for-tests"


@pytest.fixture
async def acl_url(redis: Redis, redis_url: str) -> AsyncIterator[str]:
    # Everything but administration, on meshserve's keys only.
    await redis.acl_setuser(
        USER,
        enabled=True,
        passwords=[f"+{PASSWORD}"],
        keys=["ms:*"],
        commands=["+@all", "-@admin", "-@dangerous", "+info"],
    )
    parts = urlsplit(redis_url)
    yield urlunsplit(parts._replace(netloc=f"{USER}:{PASSWORD}@{parts.hostname}:{parts.port}"))
    await redis.acl_deluser(USER)


async def test_the_mesh_serves_as_an_acl_user_confined_to_its_keys(acl_url: str, model_repository: Path) -> None:
    mesh = await start_mesh(acl_url, model_repository)
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            request = infer_request("mlp", {"features": np.ones((2, 64), np.float32)})
            response = await infer_stub(channel).ModelInfer(request, timeout=10)
        assert output_arrays(response)["logits"].shape == (2, 10)
    finally:
        await stop_mesh(mesh)


async def test_the_acl_user_is_really_confined(acl_url: str) -> None:
    client = Redis.from_url(acl_url)
    try:
        assert await client.set("ms:probe", 1)
        with pytest.raises(NoPermissionError):
            await client.set("elsewhere", 1)
    finally:
        await client.aclose()
    wrong = Redis.from_url(acl_url.replace(PASSWORD, "wrong"))
    with pytest.raises(AuthenticationError):
        await wrong.ping()
    await wrong.aclose()
