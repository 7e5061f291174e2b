"""Tenants through the real gateway: API keys, allowed models, admission limits,
tiers, and reloading the tenants file."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio import Redis

from meshserve.queue import TIER_SPAN, ModelKeys
from meshserve.tenancy.tenants import hash_key
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from tests.support import (
    Mesh,
    hold_serving,
    infer_request,
    infer_stub,
    output_arrays,
    release_serving,
    start_mesh,
    stop_mesh,
    wait_queued,
)

TENANTS = f"""
tenants:
  - name: acme
    api_keys: ["{hash_key("acme-key")}"]
    tier: realtime
    models: ["mlp", "cnn"]
  - name: metered
    api_keys: ["{hash_key("metered-key")}"]
    rate_per_s: 0.1
    burst: 2
    models: ["*"]
  - name: narrow
    api_keys: ["{hash_key("narrow-key")}"]
    tier: batch
    max_inflight: 1
    models: ["mlp"]
"""


def auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def mlp_request(**kwargs: object) -> pb.ModelInferRequest:
    return infer_request("mlp", {"features": np.ones((1, 64), np.float32)}, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def tenant_mesh(redis: Redis, redis_url: str, model_repository: Path, tmp_path: Path) -> AsyncIterator[Mesh]:
    path = tmp_path / "tenants.yaml"
    path.write_text(TENANTS)
    mesh = await start_mesh(redis_url, model_repository, tenants_path=path)
    try:
        yield mesh
    finally:
        await stop_mesh(mesh)


@pytest.fixture
async def tstub(tenant_mesh: Mesh) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    async with grpc.aio.insecure_channel(tenant_mesh.address) as channel:
        yield infer_stub(channel)


def rejections(mesh: Mesh, tenant: str, reason: str) -> float:
    value = mesh.gateway.metrics.registry.get_sample_value(
        "meshserve_rejections_total", {"tenant": tenant, "reason": reason}
    )
    return value or 0.0


async def settle(mesh: Mesh) -> None:
    """Until the gateway's background releases (admission slots) are done."""
    await mesh.gateway.gateway.settle()


async def test_model_rpcs_need_a_known_key_while_health_stays_open(
    tenant_mesh: Mesh, tstub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    for metadata in ((), auth("wrong-key"), (("authorization", "Basic YWNtZQ=="),)):
        with pytest.raises(grpc.aio.AioRpcError) as infer:
            await tstub.ModelInfer(mlp_request(), metadata=metadata, timeout=5)
        assert infer.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "missing or unknown API key" in (infer.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as meta:
            await tstub.ModelMetadata(pb.ModelMetadataRequest(name="mlp"), metadata=metadata, timeout=5)
        assert meta.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (await tstub.ServerLive(pb.ServerLiveRequest(), timeout=5)).live
    assert (await tstub.ServerReady(pb.ServerReadyRequest(), timeout=5)).ready
    async with grpc.aio.insecure_channel(tenant_mesh.address) as channel:
        status = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    response = await tstub.ModelInfer(mlp_request(), metadata=auth("acme-key"), timeout=5)
    assert output_arrays(response)["logits"].shape == (1, 10)
    assert rejections(tenant_mesh, "<unauthenticated>", "unauthenticated") == 3


async def test_a_forbidden_model_is_denied_without_revealing_whether_it_exists(
    tenant_mesh: Mesh, tstub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    details = {}
    for model in ("adder_fixed", "no_such_model"):  # the first exists, the second does not
        request = infer_request(model, {"a": np.zeros((1, 4), np.int64)})
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await tstub.ModelInfer(request, metadata=auth("acme-key"), timeout=5)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        details[model] = (denied.value.details() or "").replace(model, "<m>")
        with pytest.raises(grpc.aio.AioRpcError) as ready:
            await tstub.ModelReady(pb.ModelReadyRequest(name=model), metadata=auth("acme-key"), timeout=5)
        assert ready.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert details["adder_fixed"] == details["no_such_model"]
    assert rejections(tenant_mesh, "acme", "permission_denied") == 2


async def test_rate_limit_answers_resource_exhausted_with_a_retry_hint(
    tenant_mesh: Mesh, tstub: pb_grpc.GRPCInferenceServiceStub, redis: Redis
) -> None:
    for _ in range(2):  # the burst
        await tstub.ModelInfer(mlp_request(), metadata=auth("metered-key"), timeout=5)
    call = tstub.ModelInfer(mlp_request(), metadata=auth("metered-key"), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as limited:
        await call
    assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "rate" in (limited.value.details() or "")
    trailers = dict(limited.value.trailing_metadata() or ())
    assert 0 < int(trailers["retry-after-ms"]) <= 10_000
    assert rejections(tenant_mesh, "metered", "rate") == 1
    # Within the retry window the gateway refuses on its own, without asking Redis:
    # even with the tenant's rate state wiped there (Redis would admit), it refuses.
    await redis.delete("ms:{t:metered}:tat")
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await tstub.ModelInfer(mlp_request(), metadata=auth("metered-key"), timeout=5)
    assert again.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert 0 < int(dict(again.value.trailing_metadata() or ())["retry-after-ms"]) <= 10_000
    assert rejections(tenant_mesh, "metered", "rate") == 2
    await settle(tenant_mesh)
    assert await redis.zcard("ms:{t:metered}:inflight") == 0  # nothing leaked
    assert await redis.keys("ms:{m:*:job:*") == []


async def test_in_flight_limit_and_tier_ceiling(
    tenant_mesh: Mesh, tstub: pb_grpc.GRPCInferenceServiceStub, redis: Redis
) -> None:
    worker = tenant_mesh.workers[0]
    await hold_serving(worker)
    try:
        # narrow is a batch-tier tenant: priority 1 cannot lift it above its tier
        first = asyncio.ensure_future(
            tstub.ModelInfer(mlp_request(priority=1), metadata=auth("narrow-key"), timeout=10)
        )
        await wait_queued(redis, "mlp", 1)
        keys = ModelKeys.for_model("mlp", 1)
        [(_, score)] = await redis.zrange(keys.ready, 0, -1, withscores=True)
        assert int(score) // TIER_SPAN == 2
        with pytest.raises(grpc.aio.AioRpcError) as second:
            await tstub.ModelInfer(mlp_request(), metadata=auth("narrow-key"), timeout=5)
        assert second.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "in flight" in (second.value.details() or "")
        # another tenant is not affected by narrow's limit
        other = asyncio.ensure_future(tstub.ModelInfer(mlp_request(), metadata=auth("acme-key"), timeout=10))
        await wait_queued(redis, "mlp", 2)
    finally:
        release_serving(worker)
    assert output_arrays(await first)["logits"].shape == (1, 10)
    assert output_arrays(await other)["logits"].shape == (1, 10)
    assert rejections(tenant_mesh, "narrow", "inflight") == 1
    await settle(tenant_mesh)
    assert await redis.zcard("ms:{t:narrow}:inflight") == 0


async def test_reload_takes_a_good_file_and_keeps_the_old_one_on_a_bad_file(
    tenant_mesh: Mesh, tstub: pb_grpc.GRPCInferenceServiceStub, tmp_path: Path
) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text(TENANTS.replace(hash_key("acme-key"), hash_key("rotated-key")))
    assert tenant_mesh.gateway.reload_tenants() is True
    await tstub.ModelInfer(mlp_request(), metadata=auth("rotated-key"), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as old:
        await tstub.ModelInfer(mlp_request(), metadata=auth("acme-key"), timeout=5)
    assert old.value.code() == grpc.StatusCode.UNAUTHENTICATED

    path.write_text("tenants:\n  - name: acme\n    api_keys: [plaintext]\n")
    assert tenant_mesh.gateway.reload_tenants() is False
    await tstub.ModelInfer(mlp_request(), metadata=auth("rotated-key"), timeout=5)
