"""grpc.health.v1 on the gateway and the router, with an entry per model version."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import Mesh

SERVING = health_pb2.HealthCheckResponse.SERVING


async def status(address: str, service: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(response.status)


async def test_gateway_and_router_report_each_model_version(mesh: Mesh) -> None:
    for address in (mesh.address, mesh.router.address):
        assert await status(address, "") == SERVING
        assert await status(address, "mlp/1") == SERVING
        assert await status(address, "cnn/1") == SERVING
    # a name nobody serves is unknown, as grpc.health.v1 says: NOT_FOUND
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.Check(health_pb2.HealthCheckRequest(service="nope/1"), timeout=5)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
