"""Spans as a collector receives them: real OTLP/gRPC export to an in-process receiver.

The receiver is a grpc.aio TraceService on port 0 in the test's event loop. The
gateway and the worker get their providers from ``telemetry.tracer_provider``
(what ``make_tracer`` builds), configured by the standard ``OTEL_*`` variables.
Providers export from their own thread with blocking calls, so flushing runs in
a thread while the loop serves the receiver; a returned flush has been received.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk.trace import TracerProvider
from redis.asyncio import Redis

from meshserve.observe.tracing import make_tracer, tenant_attribute, tracer_provider
from protos import grpc_service_pb2_grpc as pb_grpc
from tests.support import (
    Mesh,
    hold_serving,
    infer_request,
    infer_stub,
    release_serving,
    start_mesh,
    stop_mesh,
    wait_queued,
)

RPC_TIMEOUT_S = 10
CLIENT_TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
CLIENT_SPAN_ID = 0x00F067AA0BA902B7
SECRET = "per-deployment-secret"
DEV_TENANT = "dev"  # the open development tenant: the mesh runs without a tenants file


def traceparent(trace_id: int, *, sampled: bool = True) -> tuple[tuple[str, str], ...]:
    return (("traceparent", f"00-{trace_id:032x}-{CLIENT_SPAN_ID:016x}-{'01' if sampled else '00'}"),)


def features(seed: int = 0) -> dict[str, np.ndarray[Any, Any]]:
    return {"features": np.full((1, 64), seed, dtype=np.float32)}


# ------------------------------------------------------------------ the receiver


def value(any_value: AnyValue) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


def attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: value(pair.value) for pair in pairs}


@dataclass
class Received:
    service: str
    span: Span

    @property
    def name(self) -> str:
        return self.span.name

    @property
    def trace_id(self) -> int:
        return int.from_bytes(self.span.trace_id, "big")

    @property
    def span_id(self) -> int:
        return int.from_bytes(self.span.span_id, "big")

    @property
    def parent_id(self) -> int | None:
        return int.from_bytes(self.span.parent_span_id, "big") if self.span.parent_span_id else None

    @property
    def attributes(self) -> dict[str, Any]:
        return attributes(self.span.attributes)

    @property
    def links(self) -> set[tuple[int, int]]:
        return {(int.from_bytes(link.trace_id, "big"), int.from_bytes(link.span_id, "big")) for link in self.span.links}


@dataclass
class Receiver(otlp_grpc.TraceServiceServicer):
    """The collector's side of OTLP/gRPC: keeps every span with its service's name."""

    spans: list[Received] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    endpoint: str = ""

    async def Export(  # noqa: N802
        self, request: otlp.ExportTraceServiceRequest, context: Any
    ) -> otlp.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            service = attributes(resource_spans.resource.attributes)["service.name"]
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(Received(service, span) for span in scope_spans.spans)
        self.arrived.set()
        return otlp.ExportTraceServiceResponse()

    def named(self, name: str) -> list[Received]:
        return [span for span in self.spans if span.name == name]

    def only(self, name: str) -> Received:
        (span,) = self.named(name)
        return span


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = grpc.aio.server()
    receiver = Receiver()
    otlp_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    receiver.endpoint = f"http://127.0.0.1:{port}"
    try:
        yield receiver
    finally:
        await server.stop(None)


@pytest.fixture
def otlp_env(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The standard variables pointing at the receiver; the test may add more."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    for name in ("OTEL_SERVICE_NAME", "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG", "OTEL_RESOURCE_ATTRIBUTES"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# ------------------------------------------------------------------ the mesh


@dataclass
class TracedMesh:
    mesh: Mesh
    stub: pb_grpc.GRPCInferenceServiceStub
    gateway: TracerProvider
    worker: TracerProvider

    async def flush(self) -> None:
        """Everything ended so far, received (export blocks: run it off the loop)."""
        for provider in (self.gateway, self.worker):
            assert await asyncio.to_thread(provider.force_flush)


@asynccontextmanager
async def traced_mesh(redis_url: str, repository: Path, **trace_settings: str) -> AsyncIterator[TracedMesh]:
    """The mesh with a provider per service, as each service's ``main()`` builds it."""
    gateway = tracer_provider("meshserve-gateway")
    worker = tracer_provider("meshserve-worker", downstream=True)
    assert gateway is not None
    assert worker is not None
    mesh = await start_mesh(
        redis_url,
        repository,
        tracer=gateway.get_tracer("meshserve"),
        worker_tracer=worker.get_tracer("meshserve"),
        worker_overrides=trace_settings,
        **trace_settings,
    )
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            yield TracedMesh(mesh, infer_stub(channel), gateway, worker)
    finally:
        await stop_mesh(mesh)
        for provider in (gateway, worker):
            await asyncio.to_thread(provider.shutdown)


async def one_batch(traced: TracedMesh, redis: Redis, metadata: list[tuple[tuple[str, str], ...]]) -> None:
    """One call per metadata, all queued before the worker claims: one batch serves them."""
    worker = traced.mesh.workers[0]
    await hold_serving(worker)
    try:
        calls = asyncio.gather(
            *(
                traced.stub.ModelInfer(infer_request("mlp", features(i)), metadata=m, timeout=RPC_TIMEOUT_S)
                for i, m in enumerate(metadata)
            )
        )
        await wait_queued(redis, "mlp", len(metadata))
    finally:
        release_serving(worker)
    await calls


# ------------------------------------------------------------------ tests


async def test_a_batch_exports_one_trace_per_request_and_links_them(
    otlp_env: pytest.MonkeyPatch, receiver: Receiver, redis: Redis, redis_url: str, model_repository: Path
) -> None:
    trace_ids = [CLIENT_TRACE_ID + i for i in range(3)]
    async with traced_mesh(redis_url, model_repository, trace_tenant="hash", trace_tenant_secret=SECRET) as traced:
        await one_batch(traced, redis, [traceparent(trace_id) for trace_id in trace_ids])
        await traced.flush()
    await receiver.arrived.wait()  # set by the flush above: no wait in practice

    hashed = hmac.new(SECRET.encode(), DEV_TENANT.encode(), hashlib.sha256).hexdigest()[:16]
    servers = {span.trace_id: span for span in receiver.named("ModelInfer")}
    enqueues = {span.trace_id: span for span in receiver.named("enqueue")}
    waits = {span.trace_id: span for span in receiver.named("queue_wait")}
    assert sorted(servers) == sorted(enqueues) == sorted(waits) == trace_ids
    for trace_id in trace_ids:
        server, enqueue, wait = servers[trace_id], enqueues[trace_id], waits[trace_id]
        assert (server.service, enqueue.service, wait.service) == ("meshserve-gateway",) * 2 + ("meshserve-worker",)
        assert server.span.kind == Span.SPAN_KIND_SERVER
        assert server.parent_id == CLIENT_SPAN_ID  # the client's span, from its traceparent
        assert enqueue.parent_id == server.span_id
        assert wait.parent_id == enqueue.span_id  # the context rode inside the queued message
        assert server.attributes["meshserve.tenant"] == wait.attributes["meshserve.tenant"] == hashed

    batch = receiver.only("batch")
    assert batch.service == "meshserve-worker"
    assert batch.parent_id is None
    assert batch.trace_id not in trace_ids
    assert batch.links == {(trace_id, enqueues[trace_id].span_id) for trace_id in trace_ids}
    assert batch.attributes == {
        "meshserve.model": "mlp",
        "meshserve.version": 1,
        "meshserve.batch_size": 3,
        "meshserve.requests": 3,
        "meshserve.device": "cpu",
        "meshserve.worker": traced.mesh.workers[0].worker.worker_id,
        "meshserve.tenancy.tenants": [hashed],
    }
    (compute,) = (span for span in receiver.named("compute") if span.trace_id == batch.trace_id)
    assert (compute.trace_id, compute.parent_id) == (batch.trace_id, batch.span_id)
    # each request's trace shows the batch's compute (linked to it) and the way back
    for trace_id in trace_ids:
        (own,) = (span for span in receiver.named("compute") if span.trace_id == trace_id)
        (reply,) = (span for span in receiver.named("reply") if span.trace_id == trace_id)
        assert (own.service, own.parent_id) == ("meshserve-worker", enqueues[trace_id].span_id)
        assert own.links == {(batch.trace_id, batch.span_id)}
        assert own.attributes["meshserve.batch_size"] == 3
        assert (own.span.start_time_unix_nano, own.span.end_time_unix_nano) == (
            compute.span.start_time_unix_nano,
            compute.span.end_time_unix_nano,
        )
        assert (reply.service, reply.parent_id) == ("meshserve-gateway", servers[trace_id].span_id)
        assert own.span.end_time_unix_nano <= reply.span.start_time_unix_nano
    assert not any(v == DEV_TENANT for span in receiver.spans for v in span.attributes.values())


async def test_the_gateway_samples_once_and_the_worker_follows(
    otlp_env: pytest.MonkeyPatch, receiver: Receiver, redis: Redis, redis_url: str, model_repository: Path
) -> None:
    otlp_env.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    otlp_env.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    async with traced_mesh(redis_url, model_repository, trace_tenant="off") as traced:
        # ratio 0 for calls that bring no decision; a client's "not sampled" is kept too
        await traced.stub.ModelInfer(infer_request("mlp", features()), timeout=RPC_TIMEOUT_S)
        await traced.stub.ModelInfer(
            infer_request("mlp", features()),
            metadata=traceparent(CLIENT_TRACE_ID + 1, sampled=False),
            timeout=RPC_TIMEOUT_S,
        )
        await traced.flush()
        assert receiver.spans == []  # no batch span either: none of its requests was sampled

        # one batch of an unsampled, a sampled and a decision-less call: only the sampled trace
        # is exported, and the batch span, since one of its requests was sampled
        await one_batch(
            traced, redis, [(), traceparent(CLIENT_TRACE_ID + 2, sampled=False), traceparent(CLIENT_TRACE_ID)]
        )
        await traced.flush()
    await receiver.arrived.wait()

    batch = receiver.only("batch")
    request_spans = [span for span in receiver.spans if span.trace_id != batch.trace_id]
    assert sorted(span.name for span in request_spans) == ["ModelInfer", "compute", "enqueue", "queue_wait", "reply"]
    assert {span.trace_id for span in request_spans} == {CLIENT_TRACE_ID}
    assert batch.attributes["meshserve.requests"] == 3
    assert (CLIENT_TRACE_ID, receiver.only("enqueue").span_id) in batch.links
    assert len(batch.links) == 3  # the unsampled requests are linked as well
    assert [span.parent_id for span in receiver.named("compute") if span.trace_id == batch.trace_id] == [batch.span_id]
    assert not any("meshserve.tenant" in span.attributes for span in receiver.spans)  # trace_tenant off
    assert "meshserve.tenancy.tenants" not in batch.attributes


# ------------------------------------------------------------------ configuration


def test_service_names_follow_otel_service_name(otlp_env: pytest.MonkeyPatch) -> None:
    default = tracer_provider("meshserve-gateway")
    otlp_env.setenv("OTEL_SERVICE_NAME", "edge")
    named = tracer_provider("meshserve-gateway")
    assert default is not None
    assert named is not None
    try:
        assert default.resource.attributes["service.name"] == "meshserve-gateway"
        assert named.resource.attributes["service.name"] == "edge"
    finally:
        default.shutdown()
        named.shutdown()


def test_no_endpoint_means_no_op_tracing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    assert tracer_provider("meshserve-worker", downstream=True) is None
    assert isinstance(make_tracer("meshserve-worker", downstream=True), trace.NoOpTracer)


def test_tenant_attribute_modes() -> None:
    assert tenant_attribute("clear")("acme") == "acme"
    assert tenant_attribute("off")("acme") is None
    assert tenant_attribute("hash")("acme") == hashlib.sha256(b"acme").hexdigest()[:16]
    keyed = tenant_attribute("hash", SECRET)
    assert keyed("acme") == hmac.new(SECRET.encode(), b"acme", hashlib.sha256).hexdigest()[:16]
    assert keyed("acme") != tenant_attribute("hash", "another deployment")("acme")
    with pytest.raises(ValueError, match="trace_tenant: expected one of clear, hash, off, got 'plain'"):
        tenant_attribute("plain")
