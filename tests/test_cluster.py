"""The request path on a Redis Cluster: three masters with a replica each on loopback
(meshserve.devkit.redis_cluster), the whole in-process mesh on a redis+cluster:// URL."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import RedisError

from gateway.routing import RoutingView
from meshserve.devkit.accumulator import write_accumulator
from meshserve.devkit.examples import write_example_repository
from meshserve.devkit.redis_cluster import RedisCluster
from meshserve.devkit.redis_server import RedisServer, RedisServerError, suite_binary_from_env
from meshserve.queue import TIER_NAMES, ModelKeys, reply_key
from meshserve.store.clients import blocking_link, command_link
from meshserve.store.cluster import command_keys, seed_urls, slot_of
from protos import grpc_service_pb2 as pb
from tests.failover import CALL_TIMEOUT_S, calls_through_a_fault
from tests.support import infer_request, infer_stub, output_arrays, start_mesh, stop_mesh


def _flush(cluster: RedisCluster) -> None:
    for node in cluster.nodes:
        if node.pid is None:
            continue
        client = cluster.client(node)
        if cluster.role(node) == b"master":
            client.flushall()


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    with RedisCluster(suite_binary_from_env()) as started:
        yield started


@pytest.fixture
def clean(cluster: RedisCluster) -> RedisCluster:
    _flush(cluster)
    return cluster


def test_a_cluster_url_names_its_seeds_with_their_credentials() -> None:
    assert seed_urls("redis+cluster://app:pw@10.0.0.1:7000,10.0.0.2:7001/?ssl_cert_reqs=none") == [
        "redis://app:pw@10.0.0.1:7000/0?ssl_cert_reqs=none",
        "redis://app:pw@10.0.0.2:7001/0?ssl_cert_reqs=none",
    ]
    assert seed_urls("rediss+cluster://h:1/")[0].startswith("rediss://h:1/")


def test_the_request_paths_scripts_and_pops_are_routed_by_their_keys_hash_tag() -> None:
    keys = ModelKeys.for_model("mlp", 1)
    slot = slot_of(keys.ready)
    assert {slot_of(k) for k in (keys.inflight, keys.wake, keys.job("x"), keys.sched)} == {slot}
    assert command_keys(("EVALSHA", "sha", 2, keys.ready, keys.inflight, "arg")) == (keys.ready, keys.inflight)
    assert command_keys(("BLMPOP", 1, 1, reply_key("g"), "LEFT", "COUNT", 8)) == (reply_key("g"),)
    assert command_keys(("BLPOP", "a", "b", 5)) == ("a", "b")
    assert command_keys(("MULTI",)) == ()


async def test_a_pipeline_over_every_node_comes_back_in_order_on_one_connection_per_node(
    clean: RedisCluster,
) -> None:
    link = command_link(clean.url)
    try:
        keys = [f"k{i}" for i in range(32)]  # spread over the three masters' slots
        replies = await link.pipeline([("SET", k, k) for k in keys] + [("GET", k) for k in keys])
        assert replies == [b"OK"] * 32 + [k.encode() for k in keys]
        # A transaction and the script after it go to their keys' node as one unit.
        job = ModelKeys.for_model("mlp", 1).job("j")
        replies = await link.pipeline([("MULTI",), ("HSET", job, "b", "x"), ("EXEC",), ("HGET", job, "b")])
        assert replies[2:] == [[1], b"x"]
        assert link.connections == 3
    finally:
        await link.aclose()


async def test_a_blocking_pop_across_slots_takes_the_first_token_and_frees_the_other_waits(
    clean: RedisCluster,
) -> None:
    wake = [ModelKeys.for_model(name, 1).wake for name in ("a", "b", "c", "d")]
    assert len({slot_of(k) for k in wake}) == 4
    link = command_link(clean.url)
    waiting = blocking_link(clean.url)
    try:
        await link.execute("RPUSH", wake[2], "1")
        first = await waiting.pipeline([("BLPOP", *wake, 5), ("ZCARD", ModelKeys.for_model("c", 1).ready)])
        assert first == [[wake[2].encode(), b"1"], 0]
        opened = waiting.connections
        pop = asyncio.ensure_future(waiting.execute("BLPOP", *wake, 5))
        await link.execute("RPUSH", wake[3], "1")
        async with asyncio.timeout(3):  # far less than the pop's own 5 s: the token ended it
            assert await pop == [wake[3].encode(), b"1"]
        # The other slots' pops were unblocked, not cut off: no connection was reopened.
        assert waiting.connections == opened
        assert await waiting.execute("BLPOP", *wake, 0.1) is None
        assert [await link.execute("LLEN", k) for k in wake] == [0, 0, 0, 0]
    finally:
        await link.aclose()
        await waiting.aclose()


async def test_a_slot_that_moved_is_followed_to_its_new_master(clean: RedisCluster) -> None:
    """A manual failover swaps a master and its replica: the link's next command meets
    MOVED (or a closed connection), reads the slot map again and succeeds there."""
    key = ModelKeys.for_model("mlp", 1).ready
    link = command_link(clean.url)
    try:
        await link.execute("ZADD", key, 1, "job")
        old = clean.master_of_slot(slot_of(key))
        replica = next(r for r in clean.replicas if _replica_of(clean, r) == old.port)
        clean.client(replica).cluster("FAILOVER")
        _wait_for(lambda: clean.master_of_slot(slot_of(key)).port == replica.port, "the replica to take over")
        assert await link.execute("ZCARD", key) == 1
        assert await link.execute("ZADD", key, 2, "job2") == 1
        assert clean.client(replica).zcard(key) == 2
    finally:
        await link.aclose()


# ------------------------------------------------------------ a slot being migrated

ASK_TAG = "{ask-mig}"
"""Keys of one slot, moved between masters by the tests below."""


class _Migration:
    """A slot half-way between two masters, as ``redis-cli --cluster reshard`` leaves
    it between its steps: IMPORTING on the target, MIGRATING on the source."""

    def __init__(self, cluster: RedisCluster, slot: int) -> None:
        self.cluster, self.slot = cluster, slot
        self.source = cluster.master_of_slot(slot)
        self.target = next(m for m in _masters(cluster) if m.port != self.source.port)
        self.source_id = _ask_node(cluster, self.source, "CLUSTER", "MYID").decode()
        self.target_id = _ask_node(cluster, self.target, "CLUSTER", "MYID").decode()
        self.begun = False

    def begin(self) -> None:
        self.begun = True
        _ask_node(self.cluster, self.target, "CLUSTER", "SETSLOT", self.slot, "IMPORTING", self.source_id)
        _ask_node(self.cluster, self.source, "CLUSTER", "SETSLOT", self.slot, "MIGRATING", self.target_id)

    def move(self, *keys: str) -> None:
        _ask_node(self.cluster, self.source, "MIGRATE", "127.0.0.1", self.target.port, "", 0, 5000, "KEYS", *keys)

    def finish(self) -> None:
        """Every key moved, then the slot given to the target on every master (as
        reshard ends); the cluster's nodes agree before the next test."""
        if not self.begun:
            return
        while keys := _ask_node(self.cluster, self.source, "CLUSTER", "GETKEYSINSLOT", self.slot, 100):
            self.move(*(k.decode() for k in keys))
        for master in (self.target, self.source, *_masters(self.cluster)):
            _ask_node(self.cluster, master, "CLUSTER", "SETSLOT", self.slot, "NODE", self.target_id)
        _wait_for(lambda: self._everyone_agrees(), f"every node to give slot {self.slot} to the target")

    def _everyone_agrees(self) -> bool:
        for node in self.cluster.nodes:
            slots = _ask_node(self.cluster, node, "CLUSTER", "SLOTS")
            if not any(s <= self.slot <= e and int(m[1]) == self.target.port for s, e, m, *_ in slots):
                return False
        return True

    def errors(self, node: RedisServer, kind: str) -> int:
        """How many times the node has answered errors of that kind (ASK, TRYAGAIN)."""
        stats = self.cluster.client(node).info("errorstats")
        return int(stats.get(f"errorstat_{kind}", {}).get("count", 0))

    def keys_on_source(self) -> int:
        return int(_ask_node(self.cluster, self.source, "CLUSTER", "COUNTKEYSINSLOT", self.slot))

    def on_target(self, *command: str | int) -> Any:
        """A command run on the target while it imports the slot (after ASKING)."""
        pipe = self.cluster.client(self.target).pipeline(transaction=False)
        pipe.execute_command("ASKING")  # type: ignore[no-untyped-call]
        pipe.execute_command(*command)  # type: ignore[no-untyped-call]
        return pipe.execute()[1]


def _masters(cluster: RedisCluster) -> list[RedisServer]:
    return [n for n in cluster.nodes if n.pid is not None and cluster.role(n) == b"master"]


def _ask_node(cluster: RedisCluster, node: RedisServer, *command: str | int) -> Any:
    return cluster.client(node).execute_command(*command)  # type: ignore[no-untyped-call]  # redis-py leaves it untyped


@pytest.fixture
def migration(clean: RedisCluster) -> Iterator[_Migration]:
    moving = _Migration(clean, slot_of(ASK_TAG))
    try:
        yield moving
    finally:
        moving.finish()


async def test_a_transaction_whose_keys_moved_is_replayed_once_on_the_importing_node(
    migration: _Migration,
) -> None:
    """The slot is migrating and the transaction's keys have been MIGRATEd: the source
    answers ASK to each queued command (so its EXEC aborts, nothing ran), and the
    link replays the whole block on the target after one ASKING. A counter shows it
    ran once; the reply is EXEC's own, with no ASKING's reply inside."""
    counter, log = f"{ASK_TAG}:n", f"{ASK_TAG}:log"
    source = migration.cluster.client(migration.source)
    source.set(counter, 5)
    source.rpush(log, "a")
    migration.begin()
    link = command_link(migration.cluster.url)
    try:
        await link.execute("PING")  # the slot map, read while the source still serves the slot
        migration.move(counter, log)
        asks = migration.errors(migration.source, "ASK")
        replies = await link.pipeline([("MULTI",), ("INCR", counter), ("RPUSH", log, "b"), ("EXEC",)])
        assert replies == [b"OK", b"QUEUED", b"QUEUED", [6, 2]]
        assert migration.errors(migration.source, "ASK") == asks + 2  # the path taken: ASK, then the target
        assert migration.on_target("GET", counter) == b"6"
        assert migration.on_target("LRANGE", log, 0, -1) == [b"a", b"b"]
        assert migration.keys_on_source() == 0
        # A single command of the slot is followed the same way.
        assert await link.execute("INCR", counter) == 7
    finally:
        await link.aclose()


async def test_a_transaction_over_half_moved_keys_waits_out_tryagain_and_runs_once(
    migration: _Migration,
) -> None:
    """One key moved, the other not: the source ASKs for the first (EXEC aborts), the
    target, asked, refuses EXEC with TRYAGAIN (it lacks the other key; nothing ran).
    The link waits and sends the block again; once the other key has moved the
    transaction runs there, once. New keys, which no node holds, wait the same way
    until the slot is the target's."""
    counter, log = f"{ASK_TAG}:n", f"{ASK_TAG}:log"
    source = migration.cluster.client(migration.source)
    source.set(counter, 5)
    source.rpush(log, "a")
    migration.begin()
    link = command_link(migration.cluster.url)
    try:
        await link.execute("PING")
        migration.move(counter)
        tries = migration.errors(migration.target, "TRYAGAIN")
        block = [("MULTI",), ("INCR", counter), ("RPUSH", log, "b"), ("EXEC",)]
        running = asyncio.ensure_future(link.pipeline(block))
        async with asyncio.timeout(10):  # polled: the target's refusals are counted, not signalled
            while migration.errors(migration.target, "TRYAGAIN") <= tries:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        assert not running.done()
        migration.move(log)
        assert await running == [b"OK", b"QUEUED", b"QUEUED", [6, 2]]
        assert migration.on_target("GET", counter) == b"6"
        assert migration.on_target("LRANGE", log, 0, -1) == [b"a", b"b"]
        assert migration.keys_on_source() == 0

        # Keys no node holds yet: TRYAGAIN on the target until the slot is its own.
        fresh = [("MULTI",), ("HSET", f"{ASK_TAG}:job", "b", "x"), ("RPUSH", f"{ASK_TAG}:q", "job"), ("EXEC",)]
        tries = migration.errors(migration.target, "TRYAGAIN")
        running = asyncio.ensure_future(link.pipeline(fresh))
        async with asyncio.timeout(10):
            while migration.errors(migration.target, "TRYAGAIN") <= tries:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        for master in (migration.target, migration.source):
            _ask_node(migration.cluster, master, "CLUSTER", "SETSLOT", migration.slot, "NODE", migration.target_id)
        assert await running == [b"OK", b"QUEUED", b"QUEUED", [1, 1]]
        assert migration.cluster.client(migration.target).lrange(f"{ASK_TAG}:q", 0, -1) == [b"job"]
        assert migration.keys_on_source() == 0
    finally:
        await link.aclose()


def _replica_of(cluster: RedisCluster, replica: RedisServer) -> int:
    """The port of the master the replica follows."""
    info = cluster.client(replica).info("replication")
    return int(info["master_port"])


def _wait_for(condition: Callable[[], bool], what: str, within_s: float = 15.0) -> None:
    """Poll a cluster condition (a failover gives no event to wait on), bounded."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except RedisServerError:  # no node answered: mid-failover, ask again
            pass
        time.sleep(0.05)
    raise AssertionError(f"waited {within_s:g} s for {what}")


async def _master_port(cluster: RedisCluster, slot: int) -> int | None:
    """The port of the master a live node says serves the slot (None: none answered)."""
    for node in cluster.nodes:
        try:
            async with AsyncRedis(host="127.0.0.1", port=node.port, socket_timeout=1.0) as client:
                for start, end, master, *_ in await client.execute_command("CLUSTER", "SLOTS"):
                    if start <= slot <= end:
                        return int(master[1])
        except RedisError:
            continue
    return None


def _leftovers(cluster: RedisCluster) -> list[bytes]:
    found: list[bytes] = []
    for node in cluster.nodes:
        if node.pid is None:
            continue
        client = cluster.client(node)
        if cluster.role(node) == b"master":
            found += [
                k
                for k in client.keys("ms:{m:*")
                if isinstance(k, bytes)
                if not k.endswith((b":fence", b":sched", b":drain"))
            ]
    return found


async def test_the_whole_mesh_answers_on_a_cluster(clean: RedisCluster, model_repository: Path) -> None:
    """Router, gateway and worker on a redis+cluster:// URL: calls to two models whose
    queues live on different masters all come back right, and nothing is left queued
    or leased (each reply was pushed, then its job acked)."""
    mesh = await start_mesh(clean.url, model_repository)
    try:
        async with grpc.aio.insecure_channel(mesh.gateway.address) as channel:
            stub = infer_stub(channel)

            async def call(i: int) -> None:
                features = np.full((1, 64), i, dtype=np.float32)
                request = infer_request("mlp", {"features": features}, outputs=("logits",), request_id=f"r{i}")
                response = await stub.ModelInfer(request, timeout=CALL_TIMEOUT_S)
                assert response.id == f"r{i}"
                assert output_arrays(response)["logits"].shape == (1, 10)

            await asyncio.gather(*(call(i) for i in range(200)))
        assert mesh.gateway.gateway.late_replies == 0
        assert _leftovers(clean) == []
        # The router's scrapes (redis-py's cluster client) read the same, drained, queue.
        assert await asyncio.to_thread(mesh.router.depths.pending, [("mlp", 1)]) == {("mlp", 1): 0}
        assert await asyncio.to_thread(mesh.router.depths.read, [("mlp", 1)]) == {
            ("mlp", 1): dict.fromkeys(TIER_NAMES, 0)
        }
    finally:
        await stop_mesh(mesh)


@pytest.mark.slow
async def test_the_mesh_keeps_answering_when_a_master_is_killed_and_its_replica_takes_over(
    model_repository: Path,
) -> None:
    """Calls run in a closed loop while the master that holds the model's queue is
    killed with SIGKILL: the cluster promotes its replica (node timeout 1 s), every
    link reads the slot map again, and the calls go on. Only UNAVAILABLE may fail,
    only around the failover; no answer is another call's; none hangs."""
    with RedisCluster(suite_binary_from_env()) as cluster:
        mesh = await start_mesh(cluster.url, model_repository)
        slot = slot_of(ModelKeys.for_model("mlp", 1).ready)

        async def kill_the_queues_master() -> float:
            victim = cluster.master_of_slot(slot)
            assert victim.pid is not None
            killed_at = time.monotonic()
            os.kill(victim.pid, signal.SIGKILL)
            async with asyncio.timeout(20):
                while await _master_port(cluster, slot) in (None, victim.port):  # noqa: ASYNC110 - no event for it
                    await asyncio.sleep(0.05)
            return time.monotonic() - killed_at

        try:
            await calls_through_a_fault(mesh, kill_the_queues_master, "cluster failover (the master of mlp's slot)")
        finally:
            await stop_mesh(mesh)


async def test_a_sequence_model_on_a_cluster_is_unready_with_the_reason_and_its_steps_are_refused(
    clean: RedisCluster, tmp_path: Path
) -> None:
    """A step's state, reply and ack are one script over two slots, which a cluster
    refuses: the worker says so at load, the model is unready with that reason, and a
    sequence step gets a gRPC error naming it at once (not a hang to its deadline)."""
    repository = write_example_repository(tmp_path / "repo", ["mlp"])
    write_accumulator(repository)
    mesh = await start_mesh(clean.url, repository, until=RoutingView.settled)
    try:
        view = mesh.gateway.routing.view
        assert ("accumulator", 1) not in view.ready
        assert "Redis Cluster is not supported for sequences" in view.failed[("accumulator", 1)]
        async with grpc.aio.insecure_channel(mesh.gateway.address) as channel:
            stub = infer_stub(channel)
            ready = await stub.ModelReady(pb.ModelReadyRequest(name="accumulator"), timeout=5)
            assert ready.ready is False
            request = infer_request("accumulator", {"x": np.array([[3]], np.int64)})
            request.parameters["sequence_id"].int64_param = 7
            request.parameters["sequence_start"].bool_param = True
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ModelInfer(request, timeout=CALL_TIMEOUT_S)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "Redis Cluster is not supported for sequences" in (refused.value.details() or "")
            features = np.ones((1, 64), np.float32)
            response = await stub.ModelInfer(infer_request("mlp", {"features": features}), timeout=CALL_TIMEOUT_S)
            assert output_arrays(response)["logits"].shape == (1, 10)  # the rest of the mesh serves
    finally:
        await stop_mesh(mesh)
