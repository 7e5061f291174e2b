"""The router's gRPC adapter over :class:`router.core.RouterCore`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from meshserve.repository import scan_repository
from meshserve.routing import spec_from_info
from meshserve.settings import RouterSettings
from meshserve.tls import add_port
from protos import meshserve_pb2 as mpb
from protos import meshserve_pb2_grpc as mpb_grpc
from router.core import RouterCore, TableSnapshot

log = logging.getLogger(__name__)


class RouterServicer(mpb_grpc.RouterServicer):
    def __init__(self, core: RouterCore, repository: Path, report_interval_ms: int) -> None:
        self.core = core
        self.repository = repository
        self.report_interval_ms = report_interval_ms

    def _table(self, snap: TableSnapshot) -> mpb.RoutingTable:
        return mpb.RoutingTable(
            generation=snap.generation,
            models=[
                spec_from_info(m, ready=(m.name, m.version) in snap.ready, repository=self.repository)
                for m in snap.models
            ],
        )

    async def WatchRoutingTable(  # noqa: N802 (gRPC method name)
        self, request: mpb.WatchRequest, context: grpc.aio.ServicerContext[mpb.WatchRequest, mpb.RoutingTable]
    ) -> AsyncIterator[mpb.RoutingTable]:
        async for snap in self.core.watch():
            yield self._table(snap)

    async def ReportWorker(  # noqa: N802
        self, request: mpb.WorkerReport, context: grpc.aio.ServicerContext[mpb.WorkerReport, mpb.WorkerAssignment]
    ) -> mpb.WorkerAssignment:
        ready = {(m.name, m.version) for m in request.models if m.ready}
        models = await self.core.report(request.worker_id, request.device, ready, draining=request.draining)
        snap = self.core.snapshot()
        return mpb.WorkerAssignment(
            models=[
                spec_from_info(m, ready=(m.name, m.version) in snap.ready, repository=self.repository) for m in models
            ],
            report_interval_ms=self.report_interval_ms,
            generation=snap.generation,
        )


class RouterServer:
    """Owns the router's gRPC server and its expiry task."""

    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        models, problems = scan_repository(settings.model_repository)
        for problem in problems:
            log.error("model repository: %s", problem)
        self.core = RouterCore(models, worker_ttl_ms=settings.worker_ttl_ms)
        self.server = grpc.aio.server()
        mpb_grpc.add_RouterServicer_to_server(
            RouterServicer(self.core, settings.model_repository, settings.report_interval_ms), self.server
        )
        self.port = add_port(self.server, f"{settings.host}:{settings.port}", settings.tls)
        self._expiry: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def start(self) -> None:
        await self.server.start()
        self._expiry = asyncio.create_task(self.core.run_expiry(self.settings.report_interval_ms / 1000))
        log.info(
            "router listening on %s%s with %d model versions",
            self.address,
            " (mutual TLS)" if self.settings.tls else "",
            len(self.core.models),
        )

    async def stop(self, grace_s: float = 1.0) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        await self.server.stop(grace_s)
