"""Redis Sentinel: ``redis+sentinel://`` URLs, a link that asks where the master is
on every connect and gives a connection up on READONLY, and the whole mesh through
a real failover (master killed with SIGKILL, the sentinels promote the replica)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError

from meshserve.devkit.redis_server import RedisServer, suite_binary_from_env
from meshserve.store.link import RedisLink
from meshserve.store.sentinel import SentinelTarget, master_client
from tests.failover import calls_through_a_fault
from tests.sentinels import MASTER_NAME, Sentinels
from tests.support import start_mesh, stop_mesh


def test_a_sentinel_url_names_the_sentinels_the_master_and_its_credentials() -> None:
    target = SentinelTarget.parse("redis+sentinel://app:s%40cret@10.0.0.1:26379,[::1]:26380/queues?db=2")
    assert target.sentinels == (("10.0.0.1", 26379), ("::1", 26380))
    assert target.master_name == "queues"
    assert target.options == {"username": "app", "password": "s@cret", "db": 2}


@pytest.mark.parametrize(
    ("url", "names"),
    [
        ("redis+sentinel://h:1/", "master's name"),
        ("redis+sentinel:///queues", "names no sentinel"),
        ("redis+sentinel://h/queues", "host:port"),
        ("redis+sentinel://h:1/queues?ssl=true", "unknown option(s) ssl"),
        ("redis+sentinel://h:1/queues?db=x", "db must be a number"),
    ],
)
def test_a_bad_sentinel_url_is_refused_naming_what_is_wrong(url: str, names: str) -> None:
    with pytest.raises(ValueError, match="redis URL") as refused:
        SentinelTarget.parse(url)
    assert names in str(refused.value)


async def test_a_link_that_meets_readonly_asks_its_resolver_again_and_retries_on_the_master() -> None:
    """The server a link is connected to becomes a replica (a failover's old master,
    back): its write answers READONLY; the link drops the connection, resolves the
    address again and the same call succeeds on the new master."""
    with RedisServer(suite_binary_from_env()) as first, RedisServer(suite_binary_from_env()) as second:
        where = [first.port]

        async def resolve() -> tuple[str, int]:
            return "127.0.0.1", where[0]

        link = RedisLink("redis://unused", resolver=resolve)
        try:
            assert await link.execute("SET", "k", "1") == b"OK"
            async with Redis(host="127.0.0.1", port=first.port) as admin:
                await admin.execute_command("REPLICAOF", "127.0.0.1", str(second.port))
                role = await admin.execute_command("ROLE")
            assert role[0] == b"slave"
            where[0] = second.port
            assert await link.execute("SET", "k", "2") == b"OK"
            assert link.connections == 2
            async with Redis(host="127.0.0.1", port=second.port) as admin:
                assert await admin.get("k") == b"2"
        finally:
            await link.aclose()


async def test_a_resolved_address_that_is_not_a_master_is_refused() -> None:
    with RedisServer(suite_binary_from_env()) as master:
        replica = RedisServer(suite_binary_from_env(), extra_args=("--replicaof", "127.0.0.1", str(master.port)))
        with replica:

            async def resolve() -> tuple[str, int]:
                return "127.0.0.1", replica.port

            link = RedisLink("redis://unused", resolver=resolve)
            try:
                with pytest.raises(ConnectionError, match="not the master"):
                    await link.execute("GET", "k")
            finally:
                await link.aclose()


@pytest.mark.slow
async def test_the_mesh_keeps_answering_through_a_sentinel_failover(model_repository: Path) -> None:
    """Calls run in a closed loop while the master is killed with SIGKILL: the
    sentinels promote the replica, every service's links ask them again, and the
    calls go on. Only UNAVAILABLE may fail, only around the failover; none hangs."""
    with Sentinels() as sentinels:
        await sentinels.wait_ready()
        mesh = await start_mesh(sentinels.url, model_repository)

        async def kill_the_master() -> float:
            assert sentinels.master.pid is not None
            os.kill(sentinels.master.pid, signal.SIGKILL)
            return await sentinels.wait_failover()

        try:
            await calls_through_a_fault(mesh, kill_the_master, f"sentinel failover (master {MASTER_NAME})")
            # The router's scrapes (redis-py's own Sentinel client) follow the master too.
            assert await asyncio.to_thread(mesh.router.depths.pending, [("mlp", 1)]) is not None  # None: no Redis
            async with await master_client(sentinels.url) as tool:  # the bench's client, on the same URL
                assert (await tool.execute_command("ROLE"))[0] == b"master"
        finally:
            await stop_mesh(mesh)
