"""Redis Sentinel: ``redis+sentinel://`` URLs, a link that asks where the master is
on every connect and gives a connection up on READONLY, and the whole mesh through
a real failover (master killed with SIGKILL, the sentinels promote the replica)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError

from meshserve.devkit.redis_server import RedisServer, suite_binary_from_env
from meshserve.store.link import RedisLink
from meshserve.store.sentinel import SentinelTarget, master_client
from tests.sentinels import MASTER_NAME, Sentinels
from tests.support import infer_request, infer_stub, output_arrays, start_mesh, stop_mesh

CALL_TIMEOUT_S = 15.0
CLIENTS = 8


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


@dataclass(slots=True)
class Tally:
    """What a closed loop of calls saw."""

    ok: int = 0
    wrong: int = 0  # an answer that is not this call's (a reply to another call)
    failed: dict[str, int] = field(default_factory=dict)
    failed_at_s: list[float] = field(default_factory=list)


async def _closed_loop(stub: object, client: int, stop: asyncio.Event, tally: Tally) -> None:
    rng = np.random.default_rng(client)
    n = 0
    while not stop.is_set():
        n += 1
        features = rng.standard_normal((1, 64)).astype(np.float32)
        features[0, 0] = client * 100_000 + n  # a mark no other call carries
        request = infer_request("mlp", {"features": features}, outputs=("logits",))
        request.id = f"c{client}-{n}"
        try:
            response = await stub.ModelInfer(request, timeout=CALL_TIMEOUT_S)  # type: ignore[attr-defined]
        except grpc.aio.AioRpcError as exc:
            tally.failed[exc.code().name] = tally.failed.get(exc.code().name, 0) + 1
            tally.failed_at_s.append(time.monotonic())
            continue
        if response.id != request.id or output_arrays(response)["logits"].shape != (1, 10):
            tally.wrong += 1
        else:
            tally.ok += 1


@pytest.mark.slow
async def test_the_mesh_keeps_answering_through_a_sentinel_failover(model_repository: Path) -> None:
    """Calls run in a closed loop while the master is killed with SIGKILL: the
    sentinels promote the replica, every service's links ask them again, and the
    calls go on. Only UNAVAILABLE may fail, only around the failover; none hangs."""
    with Sentinels() as sentinels:
        await sentinels.wait_ready()
        mesh = await start_mesh(sentinels.url, model_repository)
        tally = Tally()
        stop = asyncio.Event()
        try:
            async with grpc.aio.insecure_channel(mesh.gateway.address) as channel:
                stub = infer_stub(channel)
                clients = [asyncio.create_task(_closed_loop(stub, i, stop, tally)) for i in range(CLIENTS)]
                async with asyncio.timeout(20):
                    while tally.ok < 200:  # noqa: ASYNC110 - warm, before the fault
                        await asyncio.sleep(0.05)
                before = tally.ok
                assert sentinels.master.pid is not None
                killed_at = time.monotonic()
                os.kill(sentinels.master.pid, signal.SIGKILL)
                promoted_s = await sentinels.wait_failover()
                async with asyncio.timeout(20):
                    while tally.ok < before + 500:  # noqa: ASYNC110 - the calls go on after it
                        await asyncio.sleep(0.05)
                stop.set()
                async with asyncio.timeout(CALL_TIMEOUT_S + 5):  # a hung call is a lost one
                    await asyncio.gather(*clients)
            # The router's scrapes (redis-py's own Sentinel client) follow the master too.
            assert await asyncio.to_thread(mesh.router.depths.pending, [("mlp", 1)]) is not None  # None: no Redis
            async with await master_client(sentinels.url) as tool:  # the bench's client, on the same URL
                assert (await tool.execute_command("ROLE"))[0] == b"master"
            window_s = max(tally.failed_at_s, default=killed_at) - killed_at
            executed = mesh.workers[0].worker.metrics.registry.get_sample_value(
                "meshserve_worker_batch_size_sum", {"model": "mlp", "version": "1"}
            )
            print(
                f"\nsentinel failover: master {MASTER_NAME} killed; sentinels promoted the replica in"
                f" {promoted_s:.2f} s; calls ok {tally.ok}, wrong {tally.wrong}, failed {tally.failed},"
                f" last failure {window_s:.2f} s after the kill; model executions {executed:.0f};"
                f" replies with no waiting call {mesh.gateway.gateway.late_replies},"
                f" jobs Redis lost {mesh.gateway.gateway.lost_jobs}"
            )
            assert tally.wrong == 0
            assert set(tally.failed) <= {"UNAVAILABLE"}
            assert window_s < promoted_s + 5  # failures only around the failover, not after it
        finally:
            stop.set()
            await stop_mesh(mesh)
