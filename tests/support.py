"""The whole mesh in the test's event loop: router, gateway and workers on ephemeral
ports, talking to the session's real Redis. Imported by in-process tests only
(tests/compat runs the mesh as a subprocess and must not load our protos)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from redis.asyncio import Redis

from gateway.routing import RoutingView
from gateway.server import GatewayServer
from meshserve.platform.tls import TlsConfig
from meshserve.queue import ModelKeys
from meshserve.settings import GatewaySettings, RouterSettings, WorkerSettings
from meshserve.wire.dtypes import KSERVE_BY_NUMPY, NUMPY_BY_KSERVE
from model_workers.server import WorkerServer
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from router.server import RouterServer


@dataclass
class Mesh:
    router: RouterServer
    gateway: GatewayServer
    workers: list[WorkerServer]

    @property
    def address(self) -> str:
        return self.gateway.address


async def start_mesh(
    redis_url: str,
    repository: Path,
    *,
    workers: int = 1,
    tracer: Any = None,
    worker_tracer: Any = None,
    tls: TlsConfig | None = None,
    worker_overrides: dict[str, Any] | None = None,
    router_overrides: dict[str, Any] | None = None,
    until: Callable[[RoutingView], bool] = RoutingView.all_ready,
    **gateway_overrides: Any,
) -> Mesh:
    """The mesh, ready; with ``tls`` every port and channel is mutual TLS with that one identity.

    ``worker_overrides`` and ``router_overrides`` are extra settings fields for every
    worker and for the router; the rest of the keyword arguments are the gateway's.
    ``tracer`` goes to the gateway, and to the workers too unless ``worker_tracer`` is given.
    ``until``: what "ready" means (default every model ready; ``RoutingView.settled``
    for a repository with models that fail to load).
    """
    router = RouterServer(
        RouterSettings(
            **(router_overrides or {}),
            model_repository=repository,
            port=0,
            report_interval_ms=200,
            tls=tls,
            redis_url=redis_url,
        )
    )
    await router.start()
    gateway = GatewayServer(
        GatewaySettings(
            **{"lame_duck_s": 0.0, **gateway_overrides},  # no balancer to leave in tests
            redis_url=redis_url,
            router_address=router.address,
            host="127.0.0.1",
            port=0,
            tls=tls,
        ),
        tracer,
    )
    await gateway.start()
    started = []
    for _ in range(workers):
        worker = WorkerServer(
            WorkerSettings(
                **(worker_overrides or {}),
                redis_url=redis_url,
                router_address=router.address,
                model_repository=repository,
                tls=tls,
            ),
            tracer if worker_tracer is None else worker_tracer,
        )
        await worker.start()
        started.append(worker)
    mesh = Mesh(router, gateway, started)
    async with asyncio.timeout(20):
        await mesh.gateway.routing.wait_for(until)
    return mesh


async def wait_ready(mesh: Mesh) -> None:
    """Until the gateway's routing table says every model is ready (event-driven)."""
    async with asyncio.timeout(20):
        await mesh.gateway.routing.wait_for(RoutingView.all_ready)


async def wait_view(mesh: Mesh, predicate: Callable[[RoutingView], bool]) -> None:
    """Until the gateway's routing view satisfies ``predicate`` (event-driven)."""
    async with asyncio.timeout(10):
        await mesh.gateway.routing.wait_for(predicate)


async def stop_mesh(mesh: Mesh) -> None:
    await mesh.gateway.stop(grace_s=2)
    for worker in mesh.workers:
        await worker.stop()
    await mesh.router.stop()


# ------------------------------------------------------------ calling the mesh


def infer_stub(channel: grpc.aio.Channel) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(channel)


def infer_request(
    model: str,
    inputs: Mapping[str, np.ndarray[Any, Any]],
    *,
    version: str = "",
    outputs: Sequence[str] = (),
    priority: int | None = None,
    timeout_us: int | None = None,
    request_id: str = "",
) -> pb.ModelInferRequest:
    """A ModelInferRequest with every input in raw_input_contents, in the given order."""
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for name, array in inputs.items():
        request.inputs.add(name=name, datatype=KSERVE_BY_NUMPY[array.dtype], shape=array.shape)
        request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    if priority is not None:
        request.parameters["priority"].uint64_param = priority
    if timeout_us is not None:
        request.parameters["timeout"].int64_param = timeout_us
    return request


def output_arrays(response: pb.ModelInferResponse) -> dict[str, np.ndarray[Any, Any]]:
    """The response's outputs as numpy arrays, by name."""
    return {
        out.name: np.frombuffer(raw, dtype=NUMPY_BY_KSERVE[out.datatype]).reshape(tuple(out.shape))
        for out, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


# ------------------------------------------------------------ driving the queue


async def hold_serving(worker: WorkerServer) -> None:
    """Stop the worker's serve loop while it idles, keeping it registered and ready.

    The worker still heartbeats to the router, so its models stay ready and the
    gateway keeps accepting requests; they wait in Redis until release_serving.
    Call only while the worker is idle (no request queued yet).
    """
    await worker.worker.idle.wait()  # blocked for work, not half-way through a claim
    serve = worker.tasks["serve"]
    serve.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await serve


def release_serving(worker: WorkerServer) -> None:
    """Restart the serve loop that hold_serving stopped."""
    assert worker.tasks["serve"].done(), "the serve loop is still running"
    worker.tasks["serve"] = asyncio.create_task(worker.worker.serve(), name="serve")


async def wait_queued(redis: Redis, model: str, count: int, version: int = 1) -> None:
    """Until ``count`` jobs wait in the model's ready set (event-driven: the enqueue
    script pushes a wake token whenever the list is empty, so each pop here is a
    fresh "something was enqueued"). A token taken here is given back for the worker."""
    keys = ModelKeys.for_model(model, version)
    popped = False
    async with asyncio.timeout(10):
        while await redis.zcard(keys.ready) < count:
            popped = bool(await redis.blpop([keys.wake], timeout=1)) or popped
    if popped and not await redis.llen(keys.wake):
        await redis.rpush(keys.wake, 1)


async def queue_leftovers(redis: Redis) -> list[str]:
    """Every job hash, ready set and inflight set left in Redis (counters excluded)."""
    keys = [key.decode() for key in await redis.keys("ms:{m:*")]
    return sorted(key for key in keys if ":job:" in key or key.endswith((":ready", ":inflight")))
