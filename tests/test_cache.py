"""The response cache: a hit answers the same bytes without the queue, a new
version never meets the old one's entries, tenants never read each other's
entries (unless the model shares its cache), a model without ``response_cache``
never caches, and the store script holds each model version's cap."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from redis.asyncio import Redis

from meshserve.devkit.examples import write_example_repository
from meshserve.store.cache import CacheKeys, lookup, store
from meshserve.store.link import RedisLink
from meshserve.tenancy.tenants import hash_key
from meshserve.wire.envelope import OFF_LOOP_BYTES
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
)

RPC_TIMEOUT_S = 20

TENANTS = f"""
tenants:
  - name: alpha
    api_keys: ["{hash_key("alpha-key")}"]
    models: ["*"]
  - name: beta
    api_keys: ["{hash_key("beta-key")}"]
    models: ["*"]
  - name: gamma
    api_keys: ["{hash_key("gamma-key")}"]
    models: ["scale_any"]
"""


def auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


ALPHA, BETA = auth("alpha-key"), auth("beta-key")


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.shutdown()


@pytest.fixture
async def cache_mesh(
    redis: Redis, redis_url: str, tmp_path: Path, exporter: InMemorySpanExporter
) -> AsyncIterator[Mesh]:
    """mlp (versions 1 and 2) and scale_cached cache per tenant, adder_fixed shares
    its cache, scale_any does not cache."""
    repository = write_example_repository(tmp_path / "models")
    shutil.rmtree(repository / "cnn")
    shutil.rmtree(repository / "mobilenet")
    shutil.copytree(repository / "mlp" / "1", repository / "mlp" / "2")
    (repository / "mlp" / "config.yaml").write_text("response_cache: true\n")
    (repository / "adder_fixed" / "config.yaml").write_text("response_cache: true\ncache_shared: true\n")
    shutil.copytree(repository / "scale_any", repository / "scale_cached")
    (repository / "scale_cached" / "config.yaml").write_text("response_cache: true\n")
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(TENANTS)
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    mesh = await start_mesh(redis_url, repository, tenants_path=tenants, tracer=provider.get_tracer("cache-tests"))
    try:
        yield mesh
    finally:
        await stop_mesh(mesh)


@pytest.fixture
async def cstub(cache_mesh: Mesh) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    async with grpc.aio.insecure_channel(cache_mesh.address) as channel:
        yield infer_stub(channel)


def mlp(value: float, *, version: str = "", request_id: str = "") -> pb.ModelInferRequest:
    x = np.full((1, 64), value, np.float32)
    return infer_request("mlp", {"features": x}, version=version, request_id=request_id)


def adder(value: int) -> pb.ModelInferRequest:
    a = np.full((1, 4), value, np.int64)
    return infer_request("adder_fixed", {"a": a, "b": a})


def cached(response: pb.ModelInferResponse) -> bool:
    return "cached" in response.parameters and response.parameters["cached"].bool_param


def sample(mesh: Mesh, name: str, labels: dict[str, str]) -> float:
    return mesh.gateway.metrics.registry.get_sample_value(name, labels) or 0.0


async def call(
    mesh: Mesh, stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest, who: tuple[tuple[str, str], ...]
) -> pb.ModelInferResponse:
    """One call, then the background store it began."""
    response = await stub.ModelInfer(request, timeout=RPC_TIMEOUT_S, metadata=who)
    await mesh.gateway.cache.settle()
    return response


async def test_a_hit_answers_the_same_bytes_without_the_queue(
    cache_mesh: Mesh, cstub: pb_grpc.GRPCInferenceServiceStub, exporter: InMemorySpanExporter
) -> None:
    first = await call(cache_mesh, cstub, mlp(0.5, request_id="one"), ALPHA)
    await hold_serving(cache_mesh.workers[0])  # nothing is computed from here on
    second = await call(cache_mesh, cstub, mlp(0.5, request_id="two"), ALPHA)
    assert not cached(first)
    assert cached(second)
    assert second.id == "two"
    del second.parameters["cached"]
    second.id = "one"
    assert second.SerializeToString() == first.SerializeToString()
    # over a stream too, with the stream's request id
    stream = cstub.ModelStreamInfer(timeout=RPC_TIMEOUT_S, metadata=ALPHA)
    await stream.write(mlp(0.5, request_id="three"))
    answer = await stream.read()
    await stream.done_writing()
    assert answer.infer_response.id == "three"
    assert cached(answer.infer_response)
    assert answer.infer_response.raw_output_contents == first.raw_output_contents
    release_serving(cache_mesh.workers[0])
    assert sample(cache_mesh, "meshserve_cache_hits_total", {"model": "mlp", "tenant": "alpha"}) == 2
    assert sample(cache_mesh, "meshserve_cache_misses_total", {"model": "mlp", "tenant": "alpha"}) == 1
    assert sample(cache_mesh, "meshserve_cache_hit_duration_seconds_count", {"model": "mlp"}) == 2
    assert sample(cache_mesh, "meshserve_cache_bytes", {"model": "mlp", "version": "2"}) > 0
    served = [
        span.attributes.get("meshserve.cache") for span in exporter.get_finished_spans() if span.name == "ModelInfer"
    ]
    assert served == ["miss", "hit", "hit"]


async def test_a_new_version_never_hits_the_old_versions_entries(
    cache_mesh: Mesh, cstub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    await call(cache_mesh, cstub, mlp(1.0, version="1"), ALPHA)
    assert cached(await call(cache_mesh, cstub, mlp(1.0, version="1"), ALPHA))
    other = await call(cache_mesh, cstub, mlp(1.0, version="2"), ALPHA)
    assert not cached(other)
    assert other.model_version == "2"
    latest = await call(cache_mesh, cstub, mlp(1.0), ALPHA)  # no version: the latest, 2
    assert cached(latest)
    assert latest.model_version == "2"


async def test_tenants_never_read_each_others_entries(
    cache_mesh: Mesh, cstub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    await call(cache_mesh, cstub, mlp(2.0), ALPHA)
    assert not cached(await call(cache_mesh, cstub, mlp(2.0), BETA))
    assert cached(await call(cache_mesh, cstub, mlp(2.0), BETA))  # its own entry now
    # a model with cache_shared: one tenant's answer serves the other
    await call(cache_mesh, cstub, adder(3), ALPHA)
    shared = await call(cache_mesh, cstub, adder(3), BETA)
    assert cached(shared)
    assert output_arrays(shared)["sum"].tolist() == [[6] * 4]


async def test_a_model_without_response_cache_never_caches(
    cache_mesh: Mesh, cstub: pb_grpc.GRPCInferenceServiceStub, redis: Redis
) -> None:
    request = infer_request("scale_any", {"image": np.ones((1, 1, 2, 3), np.float32)})
    for _ in range(2):
        assert not cached(await call(cache_mesh, cstub, request, ALPHA))
    assert await redis.keys("ms:{c:scale_any*") == []
    assert sample(cache_mesh, "meshserve_cache_misses_total", {"model": "scale_any", "tenant": "alpha"}) == 0


async def test_the_store_holds_the_cap_evicting_the_oldest(link: RedisLink, redis: Redis) -> None:
    keys = CacheKeys.for_model("m", 1)
    results = [
        await store(link, keys, f"t:{index}", bytes([index]) * 100, ttl_ms=60_000, cap_bytes=250) for index in range(5)
    ]
    assert [r.held_bytes for r in results] == [100, 200, 200, 200, 200]
    assert [r.evicted for r in results] == [0, 0, 1, 1, 1]
    assert await lookup(link, keys, "t:2") is None  # evicted
    assert await lookup(link, keys, "t:4") == bytes([4]) * 100
    assert await redis.hlen(keys.entries) == 2
    assert int(await redis.hget(keys.sizes, "total")) == 200
    too_big = await store(link, keys, "t:big", b"x" * 251, ttl_ms=60_000, cap_bytes=250)
    assert not too_big.stored
    assert too_big.held_bytes == 200
    assert 0 < await redis.pttl(keys.entries) <= 60_000  # the whole cache expires once unused


async def test_an_expired_entry_is_a_miss_and_is_dropped(link: RedisLink, redis: Redis) -> None:
    keys = CacheKeys.for_model("m", 1)
    await store(link, keys, "t:old", b"a" * 10, ttl_ms=60_000, cap_bytes=1000)
    await redis.zadd(keys.expiry, {"t:old": 0})  # expired long ago, whatever the clock
    assert await lookup(link, keys, "t:old") is None
    result = await store(link, keys, "t:new", b"b" * 10, ttl_ms=60_000, cap_bytes=1000)
    assert result.expired == 1
    assert result.held_bytes == 10
    assert await redis.hkeys(keys.entries) == [b"t:new"]


async def test_a_tenant_never_reads_a_model_it_may_not_use_from_the_cache(
    cache_mesh: Mesh, cstub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    await call(cache_mesh, cstub, adder(4), ALPHA)  # shared: any tenant's request would hit it
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await cstub.ModelInfer(adder(4), timeout=RPC_TIMEOUT_S, metadata=auth("gamma-key"))
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert sample(cache_mesh, "meshserve_cache_hits_total", {"model": "adder_fixed", "tenant": "gamma"}) == 0


async def test_a_large_request_is_hashed_and_cached_too(
    cache_mesh: Mesh, cstub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    image = np.random.default_rng(3).standard_normal((1, 1, 640, 480)).astype(np.float32)
    assert image.nbytes > OFF_LOOP_BYTES  # hashed on a thread
    big = infer_request("scale_cached", {"image": image})
    first = await call(cache_mesh, cstub, big, ALPHA)
    again = await call(cache_mesh, cstub, big, ALPHA)
    assert not cached(first)
    assert cached(again)
    assert again.raw_output_contents == first.raw_output_contents
    np.testing.assert_array_equal(output_arrays(again)["scaled"], image * 2 + 1)
    # with ids: a hit's response is built on a thread from the stored reply's buffer,
    # and over a stream a new large answer gets its id and the stream's framing there too
    hit = await call(cache_mesh, cstub, infer_request("scale_cached", {"image": image}, request_id="big-hit"), ALPHA)
    assert hit.id == "big-hit"
    assert cached(hit)
    assert hit.raw_output_contents == first.raw_output_contents
    other = image + 1  # not in the cache yet
    stream = cstub.ModelStreamInfer(timeout=RPC_TIMEOUT_S, metadata=ALPHA)
    await stream.write(infer_request("scale_cached", {"image": other}, request_id="big-stream"))
    answer = await stream.read()
    await stream.done_writing()
    assert answer.infer_response.id == "big-stream"
    assert not cached(answer.infer_response)
    np.testing.assert_array_equal(output_arrays(answer.infer_response)["scaled"], other * 2 + 1)
