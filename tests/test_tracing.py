"""One trace per request across the hops (invariant 7), with an in-memory exporter.

The gateway's server span and enqueue span, and the worker's queue-wait span,
share the request's trace; the worker's batch span is a root of its own that
links every request it served; compute is the batch's child.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from redis.asyncio import Redis

from protos import grpc_service_pb2_grpc as pb_grpc
from tests.support import (
    Mesh,
    hold_serving,
    infer_request,
    output_arrays,
    release_serving,
    start_mesh,
    stop_mesh,
    wait_queued,
)

RPC_TIMEOUT_S = 10
CLIENT_TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
CLIENT_SPAN_ID = 0x00F067AA0BA902B7


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.shutdown()


@pytest.fixture
async def mesh(
    redis: Redis, redis_url: str, model_repository: Path, exporter: InMemorySpanExporter
) -> AsyncIterator[Mesh]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    mesh = await start_mesh(redis_url, model_repository, tracer=provider.get_tracer("meshserve-tests"))
    try:
        yield mesh
    finally:
        await stop_mesh(mesh)
        provider.shutdown()


def features(seed: int = 0) -> dict[str, np.ndarray]:
    return {"features": np.full((1, 64), seed, dtype=np.float32)}


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


def only(spans: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    (span,) = by_name(spans, name)
    return span


async def test_one_request_is_one_trace_across_gateway_and_worker(
    stub: pb_grpc.GRPCInferenceServiceStub, exporter: InMemorySpanExporter
) -> None:
    response = await stub.ModelInfer(infer_request("mlp", features()), timeout=RPC_TIMEOUT_S)
    assert output_arrays(response)["logits"].shape == (1, 10)

    spans = exporter.get_finished_spans()
    server = only(spans, "ModelInfer")
    enqueue = only(spans, "enqueue")
    queue_wait = only(spans, "queue_wait")
    batch = only(spans, "batch")
    compute = only(spans, "compute")
    trace_id = server.context.trace_id

    assert server.kind == SpanKind.SERVER
    assert server.parent is None  # no traceparent came in: the gateway starts the trace
    assert server.attributes["meshserve.model"] == "mlp"
    assert enqueue.context.trace_id == trace_id
    assert enqueue.parent.span_id == server.context.span_id
    # the worker picks the context up from inside the queued message
    assert queue_wait.context.trace_id == trace_id
    assert queue_wait.parent.span_id == enqueue.context.span_id
    assert queue_wait.start_time <= queue_wait.end_time <= batch.end_time
    # the batch is its own root and links the request it served
    assert batch.parent is None
    assert batch.context.trace_id != trace_id
    assert [(link.context.trace_id, link.context.span_id) for link in batch.links] == [
        (trace_id, enqueue.context.span_id)
    ]
    assert batch.attributes["meshserve.batch_size"] == 1
    assert batch.attributes["meshserve.requests"] == 1
    assert compute.context.trace_id == batch.context.trace_id
    assert compute.parent.span_id == batch.context.span_id


async def test_incoming_traceparent_is_honoured(
    stub: pb_grpc.GRPCInferenceServiceStub, exporter: InMemorySpanExporter
) -> None:
    traceparent = f"00-{CLIENT_TRACE_ID:032x}-{CLIENT_SPAN_ID:016x}-01"

    await stub.ModelInfer(
        infer_request("mlp", features()), metadata=(("traceparent", traceparent),), timeout=RPC_TIMEOUT_S
    )

    spans = exporter.get_finished_spans()
    server = only(spans, "ModelInfer")
    assert server.context.trace_id == CLIENT_TRACE_ID
    assert server.parent is not None
    assert server.parent.span_id == CLIENT_SPAN_ID
    assert server.parent.is_remote
    assert only(spans, "queue_wait").context.trace_id == CLIENT_TRACE_ID
    assert [link.context.trace_id for link in only(spans, "batch").links] == [CLIENT_TRACE_ID]


async def test_a_batch_links_every_request_it_served(
    mesh: Mesh, stub: pb_grpc.GRPCInferenceServiceStub, exporter: InMemorySpanExporter, redis: Redis
) -> None:
    count = 5
    trace_ids = [CLIENT_TRACE_ID + i for i in range(count)]
    worker = mesh.workers[0]
    await hold_serving(worker)
    try:
        calls = [
            stub.ModelInfer(
                infer_request("mlp", features(i)),
                metadata=(("traceparent", f"00-{trace_id:032x}-{CLIENT_SPAN_ID:016x}-01"),),
                timeout=RPC_TIMEOUT_S,
            )
            for i, trace_id in enumerate(trace_ids)
        ]
        gathered = asyncio.gather(*calls)
        await wait_queued(redis, "mlp", count)
    finally:
        release_serving(worker)
    await gathered

    spans = exporter.get_finished_spans()
    batch = only(spans, "batch")
    assert batch.attributes["meshserve.requests"] == count
    assert sorted(link.context.trace_id for link in batch.links) == trace_ids
    enqueue_spans = {span.context.trace_id: span.context.span_id for span in by_name(spans, "enqueue")}
    assert {link.context.trace_id: link.context.span_id for link in batch.links} == enqueue_spans
    assert sorted(span.context.trace_id for span in by_name(spans, "queue_wait")) == trace_ids
    assert sorted(span.context.trace_id for span in by_name(spans, "ModelInfer")) == trace_ids
    assert only(spans, "compute").parent.span_id == batch.context.span_id
