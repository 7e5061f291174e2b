"""Live placement: running workers follow the router's assignment as devices come and go.

A second worker on a GPU joins and the router moves a ``device: any`` model onto
it, make-before-break: the CPU worker keeps serving it until the GPU worker
reports it ready, then drains it. When the GPU worker stops, the model moves
back. The GPU here is "cuda:0" on a host without NVML: the worker describes it as
a GPU of unknown memory (where anything fits) and ONNX Runtime runs it on its CPU
provider, which is all placement needs to see.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio import Redis

from meshserve.devkit.examples import write_example_repository
from meshserve.models.repository import load_model
from meshserve.queue import ModelKeys
from meshserve.settings import WorkerSettings
from model_workers.server import WorkerServer
from model_workers.session import LoadedModel
from router.core import RouterCore
from router.placement import Footprint, Slot
from tests.support import (
    Mesh,
    hold_serving,
    infer_request,
    infer_stub,
    output_arrays,
    queue_leftovers,
    release_serving,
    start_mesh,
    stop_mesh,
    wait_queued,
    wait_view,
)

RPC_TIMEOUT_S = 10
EVENT_TIMEOUT_S = 20
INPUTS = {
    "mlp": {"features": np.ones((1, 64), np.float32)},
    "cnn": {"image": np.ones((1, 3, 32, 32), np.float32)},
}
SERVING = health_pb2.HealthCheckResponse.SERVING
UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def write_repository(root: Path, placements: dict[str, str]) -> Path:
    """Example models with a ``placement: {device: ...}`` section each."""
    write_example_repository(root, list(placements))
    for name, device in placements.items():
        (root / name / "config.yaml").write_text(f"placement:\n  device: {device}\n")
    return root


async def wait_health(worker: WorkerServer, service: str, status: int) -> None:
    """Until the worker's health Watch of ``service`` says ``status`` (event-driven)."""
    async with grpc.aio.insecure_channel(worker.health_address) as channel, asyncio.timeout(EVENT_TIMEOUT_S):
        request = health_pb2.HealthCheckRequest(service=service)
        async for reply in health_pb2_grpc.HealthStub(channel).Watch(request):
            if reply.status == status:
                return


async def start_worker(mesh: Mesh, redis_url: str, repository: Path, device: str) -> WorkerServer:
    worker = WorkerServer(
        WorkerSettings(
            redis_url=redis_url, router_address=mesh.router.address, model_repository=repository, device=device
        )
    )
    await worker.start()
    mesh.workers.append(worker)
    return worker


async def stop_worker(mesh: Mesh, worker: WorkerServer) -> None:
    await worker.stop()
    mesh.workers.remove(worker)


async def infer_ok(mesh: Mesh, model: str, count: int) -> None:
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        stub = infer_stub(channel)
        for _ in range(count):
            await stub.ModelInfer(infer_request(model, INPUTS[model]), timeout=RPC_TIMEOUT_S)


@dataclass
class Stream:
    """Clients calling one model back to back until told to stop; every answer noted."""

    sent: list[str] = field(default_factory=list)
    answered: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    progress: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def answered_at_least(self, count: int) -> None:
        """Until ``count`` calls were answered (or one failed), within EVENT_TIMEOUT_S."""
        async with asyncio.timeout(EVENT_TIMEOUT_S), self.progress:
            await self.progress.wait_for(lambda: len(self.answered) >= count or bool(self.failed))

    async def run(self, address: str, model: str, clients: int = 4) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = infer_stub(channel)

            async def client(n: int) -> None:
                while not self.stop.is_set():
                    request_id = f"c{n}-{len(self.sent)}"
                    self.sent.append(request_id)
                    try:
                        request = infer_request(model, INPUTS[model], request_id=request_id)
                        response = await stub.ModelInfer(request, timeout=RPC_TIMEOUT_S)
                        self.answered.append(response.id)
                    except grpc.aio.AioRpcError as exc:
                        self.failed.append(f"{request_id}: {exc.code().name} {exc.details()}")
                    async with self.progress:
                        self.progress.notify_all()

            await asyncio.gather(*(client(n) for n in range(clients)))


@pytest.fixture
async def moving_mesh(redis: Redis, redis_url: str, tmp_path: Path) -> AsyncIterator[Mesh]:
    """One CPU worker holding mlp (``device: any``) and cnn (``device: cpu``)."""
    repository = write_repository(tmp_path, {"mlp": "any", "cnn": "cpu"})
    mesh = await start_mesh(redis_url, repository)
    try:
        yield mesh
    finally:
        await stop_mesh(mesh)
    assert await redis.keys("ms:{w:*") == []  # every worker deleted its own wake list


async def join_gpu(mesh: Mesh, redis_url: str) -> WorkerServer:
    """A GPU worker joins and takes mlp over; returns once the CPU worker dropped it."""
    gpu = await start_worker(mesh, redis_url, mesh.router.settings.model_repository, "cuda:0")
    await wait_health(mesh.workers[0], "mlp/1", UNKNOWN)
    return gpu


async def test_a_model_moves_to_a_joining_gpu_and_back_without_losing_a_request(
    moving_mesh: Mesh, redis: Redis, redis_url: str
) -> None:
    mesh = moving_mesh
    cpu = mesh.workers[0]
    assert cpu.worker.readiness() == {("mlp", 1): True, ("cnn", 1): True}
    stream = Stream()
    streaming = asyncio.create_task(stream.run(mesh.address, "mlp"))
    try:
        await stream.answered_at_least(4)  # calls flow, on the CPU worker: the only one
        gpu = await join_gpu(mesh, redis_url)
        await stream.answered_at_least(len(stream.answered) + 4)  # and go on flowing, now to the GPU
    finally:
        stream.stop.set()
        await streaming
    assert gpu.worker.readiness() == {("mlp", 1): True}
    assert cpu.worker.readiness() == {("cnn", 1): True}
    assert stream.failed == []
    assert sorted(stream.answered) == sorted(stream.sent)  # each call answered once
    # The stream ran across the move: the GPU worker computed some of its calls.
    streamed_on_gpu = gpu.worker.served[("mlp", 1)].stats.requests
    assert streamed_on_gpu >= 1
    await infer_ok(mesh, "mlp", 8)
    assert gpu.worker.served[("mlp", 1)].stats.requests == streamed_on_gpu + 8
    for worker in mesh.workers:
        await worker.worker.leases.flushed()
    assert await queue_leftovers(redis) == []

    await stop_worker(mesh, gpu)  # the router moves mlp back as soon as the GPU drains
    await wait_health(cpu, "mlp/1", SERVING)
    await wait_view(mesh, lambda view: ("mlp", 1) in view.ready)
    await infer_ok(mesh, "mlp", 8)
    assert cpu.worker.served[("mlp", 1)].stats.requests == 8


async def test_a_wake_token_taken_for_a_dropped_model_is_given_back(
    moving_mesh: Mesh, redis: Redis, redis_url: str
) -> None:
    mesh = moving_mesh
    cpu, gpu = mesh.workers[0], await join_gpu(mesh, redis_url)
    await hold_serving(gpu)
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        call = asyncio.ensure_future(
            infer_stub(channel).ModelInfer(infer_request("mlp", INPUTS["mlp"]), timeout=RPC_TIMEOUT_S)
        )
        await wait_queued(redis, "mlp", 1)
        wake = ModelKeys.for_model("mlp", 1).wake
        token = await redis.lpop(wake)  # as the CPU worker's wait would, just after the drop
        assert token is not None
        assert await cpu.worker.serve_loop.woken((wake.encode(), token)) == []
        assert await redis.llen(wake) == 1
        release_serving(gpu)
        await call
    assert gpu.worker.served[("mlp", 1)].stats.requests == 1


async def test_a_dropped_model_finishes_its_batch_in_hand_first(moving_mesh: Mesh, redis_url: str) -> None:
    mesh = moving_mesh
    cpu = mesh.workers[0]
    model = cpu.worker.served[("mlp", 1)].model
    running, release, original = asyncio.Event(), threading.Event(), model.run
    loop = asyncio.get_running_loop()

    def held(inputs: dict[str, Any], options: Any = None) -> list[Any]:  # runs in the worker's compute thread
        loop.call_soon_threadsafe(running.set)
        assert release.wait(EVENT_TIMEOUT_S)
        return original(inputs, options)

    model.run = held  # type: ignore[method-assign]
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        call = asyncio.ensure_future(
            infer_stub(channel).ModelInfer(infer_request("mlp", INPUTS["mlp"]), timeout=RPC_TIMEOUT_S)
        )
        try:
            async with asyncio.timeout(EVENT_TIMEOUT_S):
                await running.wait()
            await start_worker(mesh, redis_url, mesh.router.settings.model_repository, "cuda:0")
            await wait_health(cpu, "mlp/1", NOT_SERVING)  # draining: claims no more
            assert ("mlp", 1) in cpu.worker.served  # the batch in hand keeps it
        finally:
            release.set()
        response = await call
    assert output_arrays(response)["logits"].shape == (1, 10)
    await wait_health(cpu, "mlp/1", UNKNOWN)
    assert ("mlp", 1) not in cpu.worker.served


def gate_loads(worker: WorkerServer, load: Callable[[str, int], LoadedModel]) -> asyncio.Event:
    """Replace the worker's load (it runs in the loader thread); the event is set at each call."""
    called = asyncio.Event()
    loop = asyncio.get_running_loop()

    def gated(name: str, version: int) -> LoadedModel:
        loop.call_soon_threadsafe(called.set)
        return load(name, version)

    worker.worker.assignment.load = gated  # type: ignore[method-assign]
    return called


async def test_a_model_loading_is_not_ready_and_does_not_stall_the_others(moving_mesh: Mesh, redis_url: str) -> None:
    mesh = moving_mesh
    cpu, gpu = mesh.workers[0], await join_gpu(mesh, redis_url)
    release = threading.Event()
    original = cpu.worker.assignment.load

    def slow(name: str, version: int) -> LoadedModel:
        assert release.wait(EVENT_TIMEOUT_S)
        return original(name, version)

    loading = gate_loads(cpu, slow)
    await stop_worker(mesh, gpu)
    async with asyncio.timeout(EVENT_TIMEOUT_S):
        await loading.wait()
    try:
        await infer_ok(mesh, "cnn", 8)  # served while mlp loads
        await wait_view(mesh, lambda view: ("mlp", 1) not in view.ready)
        assert ("mlp", 1) not in cpu.worker.served
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await infer_stub(channel).ModelInfer(infer_request("mlp", INPUTS["mlp"]), timeout=RPC_TIMEOUT_S)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        release.set()
    await wait_health(cpu, "mlp/1", SERVING)
    await wait_view(mesh, lambda view: ("mlp", 1) in view.ready)
    await infer_ok(mesh, "mlp", 2)


async def test_a_model_that_fails_to_load_is_not_retried_every_heartbeat(
    moving_mesh: Mesh, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    mesh = moving_mesh
    cpu, gpu = mesh.workers[0], await join_gpu(mesh, redis_url)
    attempts: list[str] = []

    def broken(name: str, version: int) -> LoadedModel:
        attempts.append(name)
        raise RuntimeError("no such luck")

    loading = gate_loads(cpu, broken)
    router, reports, heard = cpu.worker.reporter.router, [0], asyncio.Event()

    class Counting:  # the worker's router stub, counting its reports
        def ReportWorker(self, *args: Any, **kwargs: Any) -> Any:  # noqa: N802
            reports[0] += 1
            if reports[0] >= 4:
                heard.set()
            return router.ReportWorker(*args, **kwargs)

    await stop_worker(mesh, gpu)
    async with asyncio.timeout(EVENT_TIMEOUT_S):
        await loading.wait()
        cpu.worker.reporter.router = Counting()  # type: ignore[assignment]
        await heard.wait()  # four heartbeats later
    assert attempts == ["mlp"]
    assert ("mlp", 1) not in cpu.worker.served
    assert any("mlp version 1 failed to load" in record.getMessage() for record in caplog.records)
    await infer_ok(mesh, "cnn", 2)


async def test_the_router_hands_a_moved_model_over_make_before_break(tmp_path: Path) -> None:
    repository = write_repository(tmp_path, {"mlp": "any"})
    mlp = ("mlp", 1)
    core = RouterCore([load_model(repository / "mlp", 1)])
    gpu = Slot("cuda:0", "gpu", memory_bytes=16 * 2**30)

    def names(models: list[Any]) -> list[str]:
        return [m.name for m in models]

    assert names(await core.report("w-cpu", "cpu", {mlp}, draining=False)) == ["mlp"]
    assert names(await core.report("w-gpu", "cuda:0", set(), draining=False, slot=gpu)) == ["mlp"]
    # placed on the GPU now, but not ready there: the CPU worker keeps it
    assert names(await core.report("w-cpu", "cpu", {mlp}, draining=False)) == ["mlp"]
    assert names(await core.report("w-gpu", "cuda:0", {mlp}, draining=False, slot=gpu)) == ["mlp"]
    assert names(await core.report("w-cpu", "cpu", {mlp}, draining=False)) == []
    assert mlp in core.snapshot().ready
    # a draining worker's device is placed on no more
    assert names(await core.report("w-gpu", "cuda:0", {mlp}, draining=True, slot=gpu)) == []
    assert names(await core.report("w-cpu", "cpu", set(), draining=False)) == ["mlp"]
    assert mlp not in core.snapshot().ready  # until the CPU worker has it loaded


async def test_an_unmeasured_footprint_does_not_replace_a_measured_one(tmp_path: Path) -> None:
    """Else the estimate, and with it the placement, would swing with the last reporter."""
    repository = write_repository(tmp_path, {"mlp": "any"})
    mlp = ("mlp", 1)
    core = RouterCore([load_model(repository / "mlp", 1)])
    measured, unmeasured = Footprint(1000, 300), Footprint(1000, 0)
    await core.report("w-cpu", "cpu", {mlp}, draining=False, footprints={mlp: measured})
    await core.report("w-gpu", "cuda:0", {mlp}, draining=False, footprints={mlp: unmeasured})
    assert core.footprints[mlp] == measured
    await core.report("w-gpu", "cuda:0", {mlp}, draining=False, footprints={mlp: Footprint(2000, 0)})
    assert core.footprints[mlp] == Footprint(2000, 0)  # other weights: a new model file
