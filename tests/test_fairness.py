"""Fair scheduling through the whole mesh: a saturated worker serves two tenants of
one tier in proportion to their weights, whatever order their requests arrived in.

The order of service is read from the worker's queue-wait spans (one per request,
ended at claim time, exported in the order the worker took the jobs), so the test
does not depend on the order in which the client happens to see replies.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from redis.asyncio import Redis

from meshserve.tenancy.tenants import hash_key
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

PER_TENANT = 150
FIRST_SERVED = 120  # both tenants still have work throughout the first 120 claims

TENANTS = f"""
tenants:
  - name: light
    api_keys: ["{hash_key("light-key")}"]
    weight: 1
    models: ["mlp"]
  - name: heavy
    api_keys: ["{hash_key("heavy-key")}"]
    weight: 3
    models: ["mlp"]
"""


@pytest.fixture
async def traced_mesh(
    redis: Redis, redis_url: str, model_repository: Path, tmp_path: Path
) -> AsyncIterator[tuple[Mesh, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    path = tmp_path / "tenants.yaml"
    path.write_text(TENANTS)
    mesh = await start_mesh(redis_url, model_repository, tracer=provider.get_tracer("fairness"), tenants_path=path)
    try:
        yield mesh, exporter
    finally:
        await stop_mesh(mesh)
        provider.shutdown()


async def test_a_saturated_worker_serves_tenants_by_weight_not_arrival(
    traced_mesh: tuple[Mesh, InMemorySpanExporter], redis: Redis
) -> None:
    mesh, exporter = traced_mesh
    worker = mesh.workers[0]
    await hold_serving(worker)
    request = infer_request("mlp", {"features": np.ones((1, 64), np.float32)})
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        stub = infer_stub(channel)
        calls = []
        # The light tenant's whole load arrives first: arrival order would serve it first.
        for tenant in ("light", "heavy"):
            metadata = (("authorization", f"Bearer {tenant}-key"),)
            calls += [
                asyncio.ensure_future(stub.ModelInfer(request, metadata=metadata, timeout=30))
                for _ in range(PER_TENANT)
            ]
            await wait_queued(redis, "mlp", len(calls))
        release_serving(worker)
        await asyncio.gather(*calls)

    served = [
        span.attributes["meshserve.tenant"] for span in exporter.get_finished_spans() if span.name == "queue_wait"
    ]
    assert sorted(served) == sorted(["light", "heavy"] * PER_TENANT)  # each request claimed exactly once
    first = served[:FIRST_SERVED]
    assert first.count("heavy") / first.count("light") == pytest.approx(3, rel=0.1)
