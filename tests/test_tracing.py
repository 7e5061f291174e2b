"""One trace per request across the hops (invariant 7), with an in-memory exporter.

The gateway's server span and enqueue span, the worker's queue-wait and compute
spans, and the gateway's reply span share the request's trace; the worker's
batch span is a root of its own that links every request it served, with a
compute child of its own; each request's compute span links the batch span.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from redis.asyncio import Redis

from meshserve.devkit.examples import write_example_repository
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
from tests.test_resilience import write_gather_model

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


def in_trace(spans: tuple[ReadableSpan, ...], trace_id: int) -> tuple[ReadableSpan, ...]:
    return tuple(span for span in spans if span.context.trace_id == trace_id)


def batch_links(span: ReadableSpan, batch: ReadableSpan) -> bool:
    """Whether ``span`` has exactly one link, to ``batch``."""
    return [(link.context.trace_id, link.context.span_id) for link in span.links] == [
        (batch.context.trace_id, batch.context.span_id)
    ]


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
    trace_id = server.context.trace_id
    compute = only(in_trace(spans, batch.context.trace_id), "compute")

    assert server.kind == SpanKind.SERVER
    assert server.parent is None  # no traceparent came in: the gateway starts the trace
    assert server.attributes["meshserve.model"] == "mlp"
    # every span of the request says which version answered (docs/lifecycle.md)
    assert {s.attributes["meshserve.version"] for s in (server, enqueue, queue_wait)} == {1}
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
    assert only(in_trace(spans, batch.context.trace_id), "compute").parent.span_id == batch.context.span_id


async def test_a_request_trace_shows_its_compute_and_the_way_back(
    stub: pb_grpc.GRPCInferenceServiceStub, exporter: InMemorySpanExporter
) -> None:
    response = await stub.ModelInfer(infer_request("mlp", features()), timeout=RPC_TIMEOUT_S)
    assert output_arrays(response)["logits"].shape == (1, 10)

    spans = exporter.get_finished_spans()
    server = only(spans, "ModelInfer")
    batch = only(spans, "batch")
    request = in_trace(spans, server.context.trace_id)
    assert sorted(span.name for span in request) == ["ModelInfer", "compute", "enqueue", "queue_wait", "reply"]
    enqueue, queue_wait, compute, reply = (
        only(request, name) for name in ("enqueue", "queue_wait", "compute", "reply")
    )

    # compute hangs off the context the request carried, like queue_wait; reply off the call's span
    assert compute.parent.span_id == enqueue.context.span_id
    assert reply.parent.span_id == server.context.span_id
    assert compute.attributes["meshserve.batch_size"] == 1
    assert compute.attributes["meshserve.model"] == "mlp"
    assert compute.attributes["meshserve.version"] == reply.attributes["meshserve.version"] == 1
    assert batch_links(compute, batch)
    # the batch's own compute and the request's cover the same run of the model
    batch_compute = only(in_trace(spans, batch.context.trace_id), "compute")
    assert (compute.start_time, compute.end_time) == (batch_compute.start_time, batch_compute.end_time)
    # in order, each inside the call: enqueued, waited, computed, came back
    ms = 1_000_000  # queue_wait starts at enqueued_ms: the call's arrival, to the millisecond
    assert server.start_time < queue_wait.start_time + ms
    assert server.start_time <= enqueue.start_time <= queue_wait.end_time <= compute.start_time
    assert compute.start_time < compute.end_time <= reply.start_time
    assert reply.start_time <= reply.end_time <= server.end_time
    assert reply.attributes["meshserve.worker"] == batch.attributes["meshserve.worker"]


async def test_each_request_of_a_batch_gets_a_compute_span_linked_to_the_one_batch(
    mesh: Mesh, stub: pb_grpc.GRPCInferenceServiceStub, exporter: InMemorySpanExporter, redis: Redis
) -> None:
    count = 3
    worker = mesh.workers[0]
    await hold_serving(worker)
    try:
        gathered = asyncio.gather(
            *(stub.ModelInfer(infer_request("mlp", features(i)), timeout=RPC_TIMEOUT_S) for i in range(count))
        )
        await wait_queued(redis, "mlp", count)
    finally:
        release_serving(worker)
    await gathered

    spans = exporter.get_finished_spans()
    batch = only(spans, "batch")
    assert batch.attributes["meshserve.requests"] == count
    servers = by_name(spans, "ModelInfer")
    assert len({server.context.trace_id for server in servers}) == count
    for server in servers:
        request = in_trace(spans, server.context.trace_id)
        compute, reply = only(request, "compute"), only(request, "reply")
        assert batch_links(compute, batch)
        assert compute.attributes["meshserve.batch_size"] == count
        assert compute.end_time <= reply.start_time <= reply.end_time <= server.end_time
    assert len({(span.start_time, span.end_time) for span in by_name(spans, "compute")}) == 1


async def test_an_unsampled_request_leaves_no_span(
    stub: pb_grpc.GRPCInferenceServiceStub, exporter: InMemorySpanExporter
) -> None:
    traceparent = f"00-{CLIENT_TRACE_ID:032x}-{CLIENT_SPAN_ID:016x}-00"  # the caller chose not to sample

    await stub.ModelInfer(
        infer_request("mlp", features()), metadata=(("traceparent", traceparent),), timeout=RPC_TIMEOUT_S
    )

    assert exporter.get_finished_spans() == ()


async def test_a_failed_batch_marks_each_request_compute_span(
    redis: Redis, redis_url: str, tmp_path: Path, exporter: InMemorySpanExporter
) -> None:
    repository = write_example_repository(tmp_path, ["mlp"])
    write_gather_model(repository)  # idx 100 makes the model fail
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    mesh = await start_mesh(redis_url, repository, tracer=provider.get_tracer("meshserve-tests"))
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await infer_stub(channel).ModelInfer(
                    infer_request("lookup", {"idx": np.array([100], np.int64)}), timeout=RPC_TIMEOUT_S
                )
        assert failed.value.code() == grpc.StatusCode.INTERNAL
    finally:
        await stop_mesh(mesh)
        provider.shutdown()

    spans = exporter.get_finished_spans()
    batch = only(spans, "batch")
    request = in_trace(spans, only(spans, "ModelInfer").context.trace_id)
    compute = only(request, "compute")
    assert batch_links(compute, batch)
    assert compute.status.status_code == StatusCode.ERROR
    assert only(in_trace(spans, batch.context.trace_id), "compute").status.status_code == StatusCode.ERROR
    assert only(request, "reply").end_time <= only(request, "ModelInfer").end_time  # the error came back too
