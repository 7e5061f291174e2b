"""KEDA's external scaler on the router (router/scaler.py), spoken to as KEDA's
operator does: a gRPC client with KEDA's proto against a running mesh whose worker
is held, so requests wait in Redis while the test reads the scaler."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest
from redis.asyncio import Redis

from protos import externalscaler_pb2 as kpb
from protos import externalscaler_pb2_grpc as kpb_grpc
from router.server import RouterServer
from tests.support import Mesh, hold_serving, infer_request, infer_stub, release_serving, wait_queued

MLP_POOL = {"models": "mlp", "targetQueueDepth": "4"}


def scaled_object(metadata: dict[str, str]) -> kpb.ScaledObjectRef:
    return kpb.ScaledObjectRef(name="workers", namespace="meshserve", scalerMetadata=metadata)


async def depth(scaler: kpb_grpc.ExternalScalerStub, metadata: dict[str, str]) -> int:
    reply = await scaler.GetMetrics(
        kpb.GetMetricsRequest(scaledObjectRef=scaled_object(metadata), metricName="queue_depth")
    )
    [value] = reply.metricValues
    assert value.metricName == "queue_depth"
    assert value.metricValueFloat == value.metricValue
    return value.metricValue


async def test_metrics_follow_depth_and_activity_is_pushed_on_the_first_enqueue(mesh: Mesh, redis: Redis) -> None:
    worker = mesh.workers[0]
    request = infer_request("mlp", {"features": np.ones((1, 64), np.float32)})
    async with grpc.aio.insecure_channel(mesh.router.address) as router, grpc.aio.insecure_channel(mesh.address) as gw:
        scaler = kpb_grpc.ExternalScalerStub(router)
        spec = await scaler.GetMetricSpec(scaled_object(MLP_POOL))
        assert [(m.metricName, m.targetSize, m.targetSizeFloat) for m in spec.metricSpecs] == [("queue_depth", 4, 4.0)]
        assert not (await scaler.IsActive(scaled_object(MLP_POOL))).result
        stream = scaler.StreamIsActive(scaled_object(MLP_POOL))
        async with asyncio.timeout(5):
            assert (await stream.read()).result is False  # the state at once, before any change

        await hold_serving(worker)
        stub = infer_stub(gw)
        calls = [asyncio.ensure_future(stub.ModelInfer(request, timeout=30))]
        async with asyncio.timeout(5):
            assert (await stream.read()).result is True  # pushed on the first enqueue
        calls += [asyncio.ensure_future(stub.ModelInfer(request, timeout=30)) for _ in range(4)]
        await wait_queued(redis, "mlp", 5)

        assert await depth(scaler, MLP_POOL) == 5
        assert await depth(scaler, {"device": "cpu"}) == 5  # mlp may be placed on the CPU
        assert await depth(scaler, {"models": "cnn"}) == 0  # another pool's queue
        assert (await scaler.IsActive(scaled_object(MLP_POOL))).result
        assert not (await scaler.IsActive(scaled_object({"models": "cnn"}))).result

        release_serving(worker)
        await asyncio.gather(*calls)
        async with asyncio.timeout(5):
            assert (await stream.read()).result is False  # idle again, pushed
        assert await depth(scaler, MLP_POOL) == 0
        assert not (await scaler.IsActive(scaled_object(MLP_POOL))).result
        stream.cancel()


async def test_backlog_seconds_is_a_second_metric_when_targeted(mesh: Mesh) -> None:
    pool = {"device": "gpu", "targetBacklogSeconds": "2.5"}
    async with grpc.aio.insecure_channel(mesh.router.address) as router:
        scaler = kpb_grpc.ExternalScalerStub(router)
        spec = await scaler.GetMetricSpec(scaled_object(pool))
        assert [(m.metricName, m.targetSizeFloat) for m in spec.metricSpecs] == [
            ("queue_depth", 16.0),
            ("backlog_seconds", 2.5),
        ]
        reply = await scaler.GetMetrics(
            kpb.GetMetricsRequest(scaledObjectRef=scaled_object(pool), metricName="s0-backlog_seconds")
        )
        assert [(v.metricName, v.metricValueFloat) for v in reply.metricValues] == [("backlog_seconds", 0.0)]


@pytest.mark.parametrize(
    ("metadata", "named"),
    [
        ({}, "exactly one of 'models'"),
        ({"models": "mlp", "device": "cpu"}, "exactly one of 'models'"),
        ({"device": "tpu"}, "'device'"),
        ({"models": "mlp", "targetQueueDepth": "0"}, "'targetQueueDepth'"),
        ({"models": "mlp", "targetQueueDepth": "2.5"}, "'targetQueueDepth'"),
        ({"models": "mlp", "targetBacklogSeconds": "soon"}, "'targetBacklogSeconds'"),
        ({"models": "mlp,nope"}, "unknown model 'nope'"),
    ],
)
async def test_bad_metadata_is_refused_naming_the_key(mesh: Mesh, metadata: dict[str, str], named: str) -> None:
    async with grpc.aio.insecure_channel(mesh.router.address) as router:
        scaler = kpb_grpc.ExternalScalerStub(router)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await scaler.GetMetricSpec(scaled_object(metadata))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert named in (raised.value.details() or "")


@pytest.mark.parametrize(
    ("redis_url", "named"),
    [
        (None, "--redis-url"),
        ("redis://127.0.0.1:1/0", "queue depths unavailable"),  # nothing listens on port 1
    ],
)
async def test_no_depth_is_unavailable_not_zero(model_repository: Path, redis_url: str | None, named: str) -> None:
    """A pool must not scale in because the router cannot read its queues."""
    from meshserve.settings import RouterSettings

    server = RouterServer(RouterSettings(model_repository=model_repository, port=0, redis_url=redis_url))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as router:
            scaler = kpb_grpc.ExternalScalerStub(router)
            for call in (
                scaler.IsActive(scaled_object(MLP_POOL)),
                anext(aiter(scaler.StreamIsActive(scaled_object(MLP_POOL)))),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await call
                assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
                assert named in (raised.value.details() or "")
    finally:
        await server.stop()
