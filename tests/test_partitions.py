"""Queue partitions (config.yaml ``queue_partitions``, docs/deploy.md#queue-partitions):
a model's queue split over P hash tags, on the session's real Redis and (marked slow)
on a real loopback Redis Cluster, with the whole in-process mesh.

- With P = 1 the key names are those of before partitions (pinned here): a mesh of
  mixed versions keeps working through a rolling upgrade.
- P = 3: requests spread over the partitions, each is answered exactly once, and the
  router's depth, its pending count and KEDA's scaler sum the partitions.
- A worker that died holding leases in partition 2: its jobs are redelivered.
- A worker serving three partitions takes from each in turn: a short partition is
  not left until a long one is empty.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from redis.asyncio import Redis

from meshserve.devkit.examples import write_example_repository
from meshserve.devkit.redis_cluster import RedisCluster
from meshserve.devkit.redis_server import suite_binary_from_env
from meshserve.models.repository import ModelInfo, RepositoryError, load_model
from meshserve.queue import TIER_NAMES, ModelKeys, QueueProtocol, partition_keys, reply_key
from meshserve.store.clients import command_link
from meshserve.store.cluster import slot_of
from meshserve.wire.codec import pack_inputs
from meshserve.wire.envelope import frame, unframe
from protos import externalscaler_pb2 as kpb
from protos import externalscaler_pb2_grpc as kpb_grpc
from protos import meshserve_pb2 as mpb
from tests.support import (
    Mesh,
    hold_serving,
    infer_request,
    infer_stub,
    output_arrays,
    queue_leftovers,
    release_serving,
    start_mesh,
    stop_mesh,
)

RPC_TIMEOUT_S = 30
PARTITIONS = partition_keys("mlp", 1, 3)
MLP_CONFIG = "queue_partitions: 3\nmax_batch_size: 4\ndynamic_batching: {max_queue_delay_ms: 0}\n"


def partitioned_repository(root: Path) -> Path:
    """The example "mlp" with three queue partitions and batches of at most 4."""
    write_example_repository(root, ["mlp"])
    (root / "mlp" / "config.yaml").write_text(MLP_CONFIG)
    return root


@pytest.fixture
async def partitioned(redis: Redis, redis_url: str, tmp_path: Path) -> AsyncIterator[Mesh]:
    mesh = await start_mesh(redis_url, partitioned_repository(tmp_path), worker_overrides={"lease_ms": 300})
    try:
        yield mesh
    finally:
        await stop_mesh(mesh)


def features(i: int) -> dict[str, np.ndarray]:
    return {"features": np.full((1, 64), i, dtype=np.float32)}


async def queued(redis: Redis) -> list[int]:
    return [int(await redis.zcard(keys.ready)) for keys in PARTITIONS]


async def until_queued(redis: Redis, count: int) -> list[int]:
    """Until ``count`` jobs wait over the partitions; each one's count. Event-driven as
    ``tests.support.wait_queued``: each enqueue leaves a wake token, popped here and
    given back for the worker at the end."""
    popped: set[bytes] = set()
    async with asyncio.timeout(10):
        while sum(depths := await queued(redis)) < count:
            if token := await redis.blpop([keys.wake for keys in PARTITIONS], timeout=1):
                popped.add(token[0])
    for keys in PARTITIONS:
        if keys.wake.encode() in popped and not await redis.llen(keys.wake):
            await redis.rpush(keys.wake, 1)
    return depths


async def call_all(mesh: Mesh, count: int) -> tuple[list[asyncio.Future], grpc.aio.Channel]:
    channel = grpc.aio.insecure_channel(mesh.address)
    stub = infer_stub(channel)
    calls = [
        asyncio.ensure_future(
            stub.ModelInfer(infer_request("mlp", features(i), request_id=f"r{i}"), timeout=RPC_TIMEOUT_S)
        )
        for i in range(count)
    ]
    return calls, channel


async def answered_once(mesh: Mesh, calls: list[asyncio.Future], redis: Redis) -> None:
    """Every call answered with its own id and result; no reply twice; nothing left queued."""
    responses = await asyncio.gather(*calls)
    assert [r.id for r in responses] == [f"r{i}" for i in range(len(calls))]
    assert all(output_arrays(r)["logits"].shape == (1, 10) for r in responses)
    assert mesh.gateway.gateway.late_replies == 0
    assert await queue_leftovers(redis) == []


async def enqueue_directly(queue: QueueProtocol, model: ModelInfo, keys: ModelKeys, job_id: str, reply_to: str) -> None:
    """One request of ``model`` on the partition ``keys``, as a gateway enqueues it."""
    deadline_ms = int(time.time() * 1000) + RPC_TIMEOUT_S * 1000
    packed = pack_inputs(infer_request("mlp", features(0)), model)
    envelope = mpb.QueuedRequest(
        id=job_id, model="mlp", version=1, tenant="t", deadline_ms=deadline_ms, reply_to=reply_to,
        inputs=packed.tensors, enqueued_ms=int(time.time() * 1000), priority=1, items=1,
        shape_signature=packed.signature,
    )  # fmt: skip
    enqueued = await queue.enqueue(
        keys, job_id, tier=1, payload=frame(envelope, packed.data), deadline_ms=deadline_ms, tenant="t",
        reply_to=reply_to, signature=packed.signature, max_queue_size=0,
    )  # fmt: skip
    assert enqueued.code == 1


# ------------------------------------------------------------ keys and config


def test_one_partition_keeps_the_key_names_of_before_partitions() -> None:
    """Pinned: a gateway or worker of an older version reads and writes these."""
    keys = ModelKeys.for_model("mlp", 1)
    assert (keys.ready, keys.inflight, keys.wake, keys.sched, keys.queued, keys.fence, keys.drain, keys.job("j")) == (
        "ms:{m:mlp:1}:ready",
        "ms:{m:mlp:1}:inflight",
        "ms:{m:mlp:1}:wake",
        "ms:{m:mlp:1}:sched",
        "ms:{m:mlp:1}:queued",
        "ms:{m:mlp:1}:fence",
        "ms:{m:mlp:1}:drain",
        "ms:{m:mlp:1}:job:j",
    )
    assert partition_keys("mlp", 1, 1) == (keys,)
    assert partition_keys("mlp", 1, 0) == (keys,)  # a router before partitions sends 0
    assert PARTITIONS[0] == keys  # partition 0 of any P is the same queue


def test_partitions_have_their_own_hash_tags_one_per_third_of_the_slots() -> None:
    """Each partition's keys share one slot; on three masters of equal slot ranges the
    three partitions land one on each (pinned names: every version must agree)."""
    assert [keys.ready for keys in PARTITIONS] == [
        "ms:{m:mlp:1}:ready",
        "ms:{m:mlp:1/1.1}:ready",
        "ms:{m:mlp:1/2.2}:ready",
    ]
    for keys in PARTITIONS:
        assert {slot_of(k) for k in (keys.inflight, keys.wake, keys.sched, keys.job("j"))} == {slot_of(keys.ready)}
    assert sorted(slot_of(keys.ready) * 3 // 16384 for keys in PARTITIONS) == [0, 1, 2]


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ("queue_partitions: 0\n", "from 1 to 64"),
        ("queue_partitions: two\n", "from 1 to 64"),
        ("queue_partitions: 65\n", "from 1 to 64"),
    ],
)
def test_a_bad_partition_count_is_refused_naming_the_key(tmp_path: Path, config: str, named: str) -> None:
    write_example_repository(tmp_path, ["mlp"])
    (tmp_path / "mlp" / "config.yaml").write_text(config)
    with pytest.raises(RepositoryError, match=f"'queue_partitions' must be an integer {named}"):
        load_model(tmp_path / "mlp", 1)


def test_the_count_is_read_from_config_yaml(tmp_path: Path) -> None:
    assert load_model(partitioned_repository(tmp_path) / "mlp", 1).queue_partitions == 3
    (tmp_path / "mlp" / "config.yaml").unlink()
    assert load_model(tmp_path / "mlp", 1).queue_partitions == 1


def test_the_gateway_picks_its_least_waiting_partition_ties_in_turn(tmp_path: Path) -> None:
    from gateway.partitions import PartitionChooser, share

    model = load_model(partitioned_repository(tmp_path) / "mlp", 1)
    chooser = PartitionChooser()
    firsts = [chooser.order(model)[0] for _ in range(3)]
    assert sorted(k.ready for k in firsts) == sorted(k.ready for k in PARTITIONS)  # all equal: in turn
    chooser.queued(PARTITIONS[0])
    chooser.queued(PARTITIONS[1])
    assert [chooser.order(model)[0] for _ in range(3)] == [PARTITIONS[2]] * 3  # the one it has least in
    chooser.answered(PARTITIONS[0])
    assert {chooser.order(model)[-1] for _ in range(3)} == {PARTITIONS[1]}  # the most waiting: tried last
    assert (share(10, 3), share(9, 3), share(0, 3)) == (4, 3, 0)  # a partition's share of a cap; 0: none


async def test_a_workers_blocking_wait_starts_at_another_partition_each_time(partitioned: Mesh) -> None:
    """The wait names every partition's wake list, first one further on at each wait:
    BLPOP pops the first list with a token, so under load each partition comes first in turn."""
    worker = partitioned.workers[0].worker
    await worker.idle.wait()  # blocked for work: no batch in hand, so the model's lists are named
    loop = worker.serve_loop
    firsts = []
    for _ in range(3):
        [(name, *keys, _timeout), *_] = loop._wait_commands(None)[0]
        assert name == "BLPOP"
        assert sorted(keys[:3]) == sorted(k.wake for k in PARTITIONS)
        firsts.append(keys[0])
    assert sorted(firsts) == sorted(k.wake for k in PARTITIONS)


# ------------------------------------------------------------ the mesh on one Redis


async def test_requests_spread_over_the_partitions_are_each_answered_once_and_depth_sums_them(
    partitioned: Mesh, redis: Redis
) -> None:
    await hold_serving(partitioned.workers[0])
    calls, channel = await call_all(partitioned, 30)
    try:
        depths = await until_queued(redis, 30)
        assert min(depths) >= 5, depths  # the gateway spreads them (its own least-waiting partition first)

        router = partitioned.router
        assert await asyncio.to_thread(router.depths.read, [("mlp", 1)]) == {
            ("mlp", 1): {**dict.fromkeys(TIER_NAMES, 0), "standard": 30}
        }
        assert await asyncio.to_thread(router.depths.pending, [("mlp", 1)]) == {("mlp", 1): 30}
        async with grpc.aio.insecure_channel(router.address) as to_router:
            ref = kpb.ScaledObjectRef(name="workers", namespace="meshserve", scalerMetadata={"models": "mlp"})
            metrics = await kpb_grpc.ExternalScalerStub(to_router).GetMetrics(
                kpb.GetMetricsRequest(scaledObjectRef=ref, metricName="queue_depth")
            )
            assert [m.metricValue for m in metrics.metricValues] == [30]

        release_serving(partitioned.workers[0])
        await answered_once(partitioned, calls, redis)
        assert partitioned.workers[0].worker.served[("mlp", 1)].stats.requests == 30
    finally:
        await channel.close()


async def test_a_dead_workers_leases_in_partition_2_are_redelivered(
    partitioned: Mesh, redis: Redis, redis_url: str
) -> None:
    """A worker that claimed partition 2's jobs and died (it never answers, never
    releases): once their leases lapse, the live worker's reaper puts them back and
    serves them; every call is answered once."""
    worker = partitioned.workers[0]
    await hold_serving(worker)
    calls, channel = await call_all(partitioned, 12)
    try:
        depths = await until_queued(redis, 12)
        link = command_link(redis_url)
        try:
            dead = await QueueProtocol(link).claim(
                PARTITIONS[2], max_items=100, lease_ms=300, worker_id="killed", scan_limit=100
            )
        finally:
            await link.aclose()
        assert len(dead.jobs) == depths[2] > 0
        assert await redis.zcard(PARTITIONS[2].inflight) == depths[2]

        release_serving(worker)
        await answered_once(partitioned, calls, redis)
        assert worker.worker.served[("mlp", 1)].stats.redelivered == depths[2]
    finally:
        await channel.close()


async def test_a_worker_takes_from_each_partition_in_turn(partitioned: Mesh, redis: Redis, redis_url: str) -> None:
    """40 jobs in partition 0 and 4 in partition 2, batches of at most 4: partition 2's
    are served within the first turns, not once partition 0 is empty."""
    worker = partitioned.workers[0]
    await hold_serving(worker)
    model = partitioned.gateway.gateway.resolve("mlp", "1")
    link = command_link(redis_url)
    reply_to = reply_key("fairness-test")
    queue = QueueProtocol(link)
    try:
        for partition, count in ((0, 40), (2, 4)):
            for i in range(count):
                await enqueue_directly(queue, model, PARTITIONS[partition], f"p{partition}-{i}", reply_to)
    finally:
        await link.aclose()
    release_serving(worker)
    order: list[str] = []
    async with asyncio.timeout(RPC_TIMEOUT_S):
        while len(order) < 44:
            _, blob = await redis.blpop([reply_to], timeout=5)
            order.append(unframe(blob, mpb.InferReply).message.id)
    assert sorted(order) == sorted([f"p0-{i}" for i in range(40)] + [f"p2-{i}" for i in range(4)])
    served_at = [at for at, job_id in enumerate(order) if job_id.startswith("p2-")]
    assert max(served_at) < 16, order  # within the first turns: 3 partitions of batches of 4, and some slack


async def test_a_full_partition_hands_the_request_to_the_next_and_the_cap_is_the_models(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    """max_queue_size 3 over 3 partitions: one each. With partitions 0 and 1 full, a
    call goes to partition 2 whichever the gateway tried first; with all three full,
    the next is refused RESOURCE_EXHAUSTED, naming the model's cap."""
    repository = partitioned_repository(tmp_path)
    (repository / "mlp" / "config.yaml").write_text(MLP_CONFIG.replace("0}", "0, max_queue_size: 3}"))
    mesh = await start_mesh(redis_url, repository)
    channel = grpc.aio.insecure_channel(mesh.address)
    try:
        await hold_serving(mesh.workers[0])
        model = mesh.gateway.gateway.resolve("mlp", "1")
        link = command_link(redis_url)
        try:
            for partition in (0, 1):
                await enqueue_directly(QueueProtocol(link), model, PARTITIONS[partition], f"full-{partition}", "r")
        finally:
            await link.aclose()
        stub = infer_stub(channel)
        accepted = asyncio.ensure_future(
            stub.ModelInfer(infer_request("mlp", features(7), request_id="fits"), timeout=RPC_TIMEOUT_S)
        )
        assert await until_queued(redis, 3) == [1, 1, 1]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ModelInfer(infer_request("mlp", features(8)), timeout=RPC_TIMEOUT_S)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue of model 'mlp' is full (3 requests waiting)" in str(refused.value.details())
        release_serving(mesh.workers[0])
        assert (await accepted).id == "fits"
    finally:
        await channel.close()
        await stop_mesh(mesh)


# ------------------------------------------------------------ the mesh on a Redis Cluster


@pytest.mark.slow
async def test_partitions_spread_over_the_masters_of_a_cluster_and_answer_once(tmp_path: Path) -> None:
    """Three masters on loopback: the three partitions of "mlp" live on three masters,
    each gets requests, every call answers once, and nothing is left queued."""
    with RedisCluster(suite_binary_from_env()) as cluster:
        assert len({cluster.master_of_slot(slot_of(keys.ready)).port for keys in PARTITIONS}) == 3
        mesh = await start_mesh(cluster.url, partitioned_repository(tmp_path))
        try:
            async with grpc.aio.insecure_channel(mesh.address) as channel:
                stub = infer_stub(channel)
                responses = await asyncio.gather(
                    *(
                        stub.ModelInfer(infer_request("mlp", features(i), request_id=f"r{i}"), timeout=RPC_TIMEOUT_S)
                        for i in range(150)
                    )
                )
            assert [r.id for r in responses] == [f"r{i}" for i in range(150)]
            assert mesh.gateway.gateway.late_replies == 0
            for keys in PARTITIONS:  # each partition's jobs were claimed (a claim of nothing counts no token)
                master = cluster.client(cluster.master_of_slot(slot_of(keys.ready)))
                assert int(master.get(keys.fence) or 0) > 0, keys.fence
                assert master.zcard(keys.ready) == 0
                assert master.zcard(keys.inflight) == 0
            assert await asyncio.to_thread(mesh.router.depths.pending, [("mlp", 1)]) == {("mlp", 1): 0}
        finally:
            await stop_mesh(mesh)
