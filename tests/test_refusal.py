"""Refusals from the metadata alone: ModelInfer answers an unknown key and a tenant
within its last rate refusal's retry-after without reading the message (issue 17)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from redis.asyncio import Redis

from gateway.refusal import MODEL_INFER
from meshserve.errors import ResourceExhausted
from meshserve.tenancy.tenants import Tenant, hash_key
from meshserve.tenancy.throttle import RateRefusals
from protos import grpc_service_pb2 as pb
from tests.support import Mesh, infer_request, output_arrays, start_mesh, stop_mesh

TENANTS = f"""
tenants:
  - name: open
    api_keys: ["{hash_key("open-key")}"]
    models: ["*"]
  - name: metered
    api_keys: ["{hash_key("metered-key")}"]
    rate_per_s: 0.1
    burst: 1
    models: ["*"]
"""

NOT_PROTOBUF = b"\xff\xff\xff\xff this is not a ModelInferRequest"
"""A body protobuf refuses to parse (field 0 with an invalid wire type): an answer other
than INVALID_ARGUMENT to it proves the gateway answered without parsing it."""


TENANT = Tenant(
    name="t",
    key_hashes=frozenset(),
    tier=0,
    weight=1.0,
    rate_per_s=2.0,
    burst=1,
    max_inflight=0,
    max_queued=0,
    models=("*",),
)


def auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture
async def mesh(redis: Redis, redis_url: str, model_repository: Path, tmp_path: Path) -> AsyncIterator[Mesh]:
    path = tmp_path / "tenants.yaml"
    path.write_text(TENANTS)
    started = await start_mesh(redis_url, model_repository, tenants_path=path)
    try:
        yield started
    finally:
        await stop_mesh(started)


@pytest.fixture
async def channel(mesh: Mesh) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(mesh.address) as opened:
        yield opened


async def raw_infer(channel: grpc.aio.Channel, body: bytes, key: str | None) -> grpc.aio.AioRpcError:
    """ModelInfer with ``body`` sent as it is; the error it must end with."""
    infer = channel.unary_unary(MODEL_INFER)  # no serializers: bytes in, bytes out
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await infer(body, metadata=auth(key) if key else (), timeout=5)
    return failed.value


def sample(mesh: Mesh, name: str, labels: dict[str, str]) -> float:
    return mesh.gateway.metrics.registry.get_sample_value(name, labels) or 0.0


def mlp_request() -> pb.ModelInferRequest:
    return infer_request("mlp", {"features": np.ones((1, 64), np.float32)})


async def test_an_unknown_key_is_refused_without_parsing_the_message(mesh: Mesh, channel: grpc.aio.Channel) -> None:
    asked = "missing or unknown API key (send 'authorization: Bearer <key>')"
    for key, details in ((None, f"{asked}, and no verified client certificate names a tenant"), ("wrong", asked)):
        refused = await raw_infer(channel, NOT_PROTOBUF, key)
        assert (refused.code(), refused.details()) == (grpc.StatusCode.UNAUTHENTICATED, details)
    # The same body from a valid key is parsed, and refused as a bad message:
    parsed = await raw_infer(channel, NOT_PROTOBUF, "open-key")
    assert parsed.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (parsed.details() or "").startswith("the call's message is not a valid ModelInferRequest")
    labels = {"tenant": "<unauthenticated>", "reason": "unauthenticated"}
    assert sample(mesh, "meshserve_rejections_total", labels) == 2
    requests = {"model": "<unread>", "code": "UNAUTHENTICATED"}
    assert sample(mesh, "meshserve_requests_total", requests) == 2


async def test_a_tenant_over_its_rate_is_refused_without_parsing_until_its_retry_after(
    mesh: Mesh, channel: grpc.aio.Channel, redis: Redis
) -> None:
    infer = channel.unary_unary(
        MODEL_INFER,
        request_serializer=pb.ModelInferRequest.SerializeToString,
        response_deserializer=pb.ModelInferResponse.FromString,
    )
    answer = await infer(mlp_request(), metadata=auth("metered-key"), timeout=5)  # the burst of one
    assert output_arrays(answer)["logits"].shape == (1, 10)
    with pytest.raises(grpc.aio.AioRpcError) as by_redis:  # Redis refuses: the gateway remembers it
        await infer(mlp_request(), metadata=auth("metered-key"), timeout=5)
    assert by_redis.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    first_ms = int(dict(by_redis.value.trailing_metadata() or ())["retry-after-ms"])
    assert 9_000 < first_ms <= 10_000  # one call per 10 s
    refused = await raw_infer(channel, NOT_PROTOBUF, "metered-key")
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    retry_after_ms = int(dict(refused.trailing_metadata() or ())["retry-after-ms"])
    assert 0 < retry_after_ms <= first_ms
    assert refused.details() == (
        f"tenant 'metered' is over its rate limit of 0.1 requests/s (burst 1); retry after {retry_after_ms} ms"
    )
    assert sample(mesh, "meshserve_rejections_total", {"tenant": "metered", "reason": "rate"}) == 2
    assert sample(mesh, "meshserve_requests_total", {"model": "<unread>", "code": "RESOURCE_EXHAUSTED"}) == 1
    # Another tenant is not held back by it, and its bad body is parsed (and refused as such).
    assert (await raw_infer(channel, NOT_PROTOBUF, "open-key")).code() == grpc.StatusCode.INVALID_ARGUMENT
    await mesh.gateway.gateway.settle()
    assert await redis.zcard("ms:{t:metered}:inflight") == 0


def test_a_cached_rate_refusal_ends_at_its_retry_after() -> None:
    now_s = [100.0]
    cache, tenant = RateRefusals(clock=lambda: now_s[0]), TENANT
    cache.check(tenant)  # nothing remembered: no refusal
    cache.remember(tenant, 0)  # no retry-after (an in-flight refusal): nothing to remember
    assert len(cache) == 0
    cache.remember(tenant, 500)
    now_s[0] = 100.2
    with pytest.raises(ResourceExhausted) as refused:
        cache.check(tenant)
    assert (refused.value.reason, refused.value.retry_after_ms) == ("rate", 300)
    assert "retry after 300 ms" in refused.value.message
    now_s[0] = 100.4999
    with pytest.raises(ResourceExhausted) as last:
        cache.check(tenant)
    assert last.value.retry_after_ms == 1  # rounded up, as Redis does: a retry before it would be refused
    now_s[0] = 100.5
    cache.check(tenant)  # ended: the next call asks Redis
    assert len(cache) == 0
    cache.remember(tenant, 500)
    cache.clear()
    cache.check(tenant)


async def test_a_call_with_no_message_is_invalid(channel: grpc.aio.Channel) -> None:
    infer = channel.stream_unary(MODEL_INFER)  # a client may half-close without a message
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await infer(iter(()), metadata=auth("open-key"), timeout=5)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the call sent none" in (failed.value.details() or "")
