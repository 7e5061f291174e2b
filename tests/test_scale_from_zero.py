"""A pool scaled to zero and back: with ``scale_from_zero`` the gateway queues a call
for a model no worker serves, KEDA's scaler (router/scaler.py) reports the pool
active, and the call is served once a worker starts, within its deadline."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio import Redis

from meshserve.settings import WorkerSettings
from model_workers.server import WorkerServer
from protos import externalscaler_pb2 as kpb
from protos import externalscaler_pb2_grpc as kpb_grpc
from tests.support import Mesh, infer_request, infer_stub, output_arrays, start_mesh, stop_mesh, wait_queued

POOL = kpb.ScaledObjectRef(name="cpu-workers", namespace="meshserve", scalerMetadata={"device": "cpu"})


async def start_worker(mesh: Mesh, redis_url: str, repository: Path) -> WorkerServer:
    worker = WorkerServer(
        WorkerSettings(
            intra_op_threads=1,
            redis_url=redis_url,
            router_address=mesh.router.address,
            model_repository=repository,
        ),
        None,
    )
    await worker.start()
    mesh.workers.append(worker)
    return worker


async def gateway_health(mesh: Mesh) -> int:
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        return int(reply.status)


@pytest.mark.parametrize("scale_from_zero", [True, False])
async def test_a_call_waits_for_the_first_worker_of_a_pool_at_zero(
    redis: Redis, redis_url: str, model_repository: Path, scale_from_zero: bool
) -> None:
    mesh = await start_mesh(
        redis_url, model_repository, workers=0, until=lambda view: bool(view.models), scale_from_zero=scale_from_zero
    )
    try:
        features = np.ones((1, 64), np.float32)
        async with (
            grpc.aio.insecure_channel(mesh.address) as gateway,
            grpc.aio.insecure_channel(mesh.router.address) as router,
        ):
            stub, scaler = infer_stub(gateway), kpb_grpc.ExternalScalerStub(router)
            call = asyncio.ensure_future(stub.ModelInfer(infer_request("mlp", {"features": features}), timeout=30))
            if not scale_from_zero:  # the default: a model no worker serves is refused at once
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await call
                assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
                assert await gateway_health(mesh) == health_pb2.HealthCheckResponse.NOT_SERVING
                return
            # The gateway stays in its Service's endpoints while no model is ready ...
            assert await gateway_health(mesh) == health_pb2.HealthCheckResponse.SERVING
            # ... the call waits in Redis, and KEDA hears that the pool has work.
            await wait_queued(redis, "mlp", 1)
            assert (await scaler.IsActive(POOL)).result
            await start_worker(mesh, redis_url, model_repository)  # what KEDA's scale-up starts
            response = await call
            assert output_arrays(response)["logits"].shape == (1, 10)
            assert not (await scaler.IsActive(POOL)).result
    finally:
        await stop_mesh(mesh)
