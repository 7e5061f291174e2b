"""What model_workers/server.py and docs/reliability.md promise of a worker's
grpc.health.v1 entries on stop: every entry, the overall "" and each
"<model>/<version>", turns NOT_SERVING before the worker stops taking batches, so
an orchestrator watching any of them sees the drain first."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import Mesh

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def statuses(address: str, entries: list[str]) -> dict[str, int]:
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        return {
            entry: (await health.Check(health_pb2.HealthCheckRequest(service=entry), timeout=5)).status
            for entry in entries
        }


@pytest.mark.timeout(30)
async def test_every_per_model_entry_turns_not_serving_before_the_worker_stops_taking_work(mesh: Mesh) -> None:
    worker = mesh.workers.pop()  # stopped here, not by the fixture
    entries = ["", *sorted(f"{name}/{version}" for name, version in worker.worker.readiness())]
    before = await statuses(worker.health_address, entries)
    at_stop: dict[str, int] = {}
    stop_taking_work = worker.worker.stop

    async def observed_stop() -> None:  # the moment the worker stops taking batches
        at_stop.update(await statuses(worker.health_address, entries))
        await stop_taking_work()

    worker.worker.stop = observed_stop  # type: ignore[method-assign]
    await worker.stop()

    assert len(entries) == 6  # "" and the five example models
    assert before == dict.fromkeys(entries, SERVING)
    assert at_stop == dict.fromkeys(entries, NOT_SERVING)
