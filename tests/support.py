"""The whole mesh in the test's event loop: router, gateway and workers on ephemeral
ports, talking to the session's real Redis. Imported by in-process tests only
(tests/compat runs the mesh as a subprocess and must not load our protos)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.server import GatewayServer
from meshserve.settings import GatewaySettings, RouterSettings, WorkerSettings
from model_workers.server import WorkerServer
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
    redis_url: str, repository: Path, *, workers: int = 1, tracer: Any = None, **gateway_overrides: Any
) -> Mesh:
    router = RouterServer(RouterSettings(model_repository=repository, port=0, report_interval_ms=200))
    await router.start()
    gateway = GatewayServer(
        GatewaySettings(
            redis_url=redis_url, router_address=router.address, host="127.0.0.1", port=0, **gateway_overrides
        ),
        tracer,
    )
    await gateway.start()
    started = []
    for _ in range(workers):
        worker = WorkerServer(
            WorkerSettings(redis_url=redis_url, router_address=router.address, model_repository=repository),
            tracer,
        )
        await worker.start()
        started.append(worker)
    mesh = Mesh(router, gateway, started)
    await wait_ready(mesh)
    return mesh


async def wait_ready(mesh: Mesh) -> None:
    """Until the gateway's routing table says every model is ready (event-driven)."""
    gateway = mesh.gateway.gateway
    async with asyncio.timeout(20):
        while not gateway.server_ready():
            gateway.table_received.clear()
            await gateway.table_received.wait()


async def stop_mesh(mesh: Mesh) -> None:
    await mesh.gateway.stop(grace_s=2)
    for worker in mesh.workers:
        await worker.stop()
    await mesh.router.stop()
