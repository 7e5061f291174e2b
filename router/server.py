"""The router's gRPC adapter over :class:`router.core.RouterCore`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from redis import Redis as SyncRedis
from redis.exceptions import RedisError

from meshserve.models.repository import scan_repository
from meshserve.observe.metrics import MetricsServer, RouterMetrics, RouterReads
from meshserve.platform.tls import add_port
from meshserve.queue.protocol import TIER_SPAN, ModelKeys
from meshserve.settings import RouterSettings
from meshserve.tenancy.tenants import TIERS
from meshserve.wire.routing import spec_from_info
from protos import meshserve_pb2 as mpb
from protos import meshserve_pb2_grpc as mpb_grpc
from router.core import ModelKey, RouterCore, TableSnapshot, slot_from_id
from router.placement import Footprint, Slot

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
        loads = {(m.name, m.version): (m.requests_total, m.queue_wait_seconds_total) for m in request.models}
        footprints = {(m.name, m.version): Footprint(m.weights_bytes, m.activation_bytes) for m in request.models}
        models = await self.core.report(
            request.worker_id,
            request.device,
            ready,
            draining=request.draining,
            loads=loads,
            slot=_slot(request),
            footprints=footprints,
        )
        snap = self.core.snapshot()
        return mpb.WorkerAssignment(
            models=[
                spec_from_info(m, ready=(m.name, m.version) in snap.ready, repository=self.repository) for m in models
            ],
            report_interval_ms=self.report_interval_ms,
            generation=snap.generation,
        )


def _slot(request: mpb.WorkerReport) -> Slot:
    """The worker's device; an older worker that does not describe it: guessed from its id."""
    if not request.device_kind:
        return slot_from_id(request.device)
    return Slot(request.device, request.device_kind, request.device_profile, request.device_memory_bytes)


class RouterServer:
    """Owns the router's gRPC server and its expiry task."""

    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        models, problems = scan_repository(settings.model_repository)
        for problem in problems:
            log.error("model repository: %s", problem)
        self.core = RouterCore(
            models, worker_ttl_ms=settings.worker_ttl_ms, headroom_ratio=settings.placement_headroom_ratio
        )
        self.server = grpc.aio.server()
        mpb_grpc.add_RouterServicer_to_server(
            RouterServicer(self.core, settings.model_repository, settings.report_interval_ms), self.server
        )
        # grpc.health.v1: "" for the router itself, "<model>/<version>" for whether any
        # live worker serves that model version (the routing table's readiness).
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._health_task: asyncio.Task[None] | None = None
        self.port = add_port(self.server, f"{settings.host}:{settings.port}", settings.tls)
        self._expiry: asyncio.Task[None] | None = None
        self._queues = SyncRedis.from_url(settings.redis_url, socket_timeout=2.0) if settings.redis_url else None
        self.metrics = RouterMetrics.create(
            RouterReads(
                ready=self._readiness,
                depths=self._queue_depths,
                loads=self.core.load_rates,
                unplaceable=self.core.unplaceable,
            )
        )
        self._metrics_server: MetricsServer | None = None

    def _readiness(self) -> dict[ModelKey, bool]:
        snap = self.core.snapshot()
        return {(m.name, m.version): (m.name, m.version) in snap.ready for m in snap.models}

    def _queue_depths(self) -> dict[ModelKey, dict[str, int]]:
        """Called in the metrics thread at scrape time: one pipelined round trip to Redis."""
        if self._queues is None:
            return {}
        keys = list(self.core.models)
        try:
            with self._queues.pipeline(transaction=False) as pipe:
                for name, version in keys:
                    ready = ModelKeys.for_model(name, version).ready
                    for tier in TIERS.values():
                        pipe.zcount(ready, tier * TIER_SPAN, f"({(tier + 1) * TIER_SPAN}")
                counts = pipe.execute()
        except RedisError as exc:  # a scrape during a Redis outage: no depths, the rest still exported
            log.warning("queue depths unavailable: %s", exc)
            return {}
        per_model = len(TIERS)
        return {
            key: dict(zip(TIERS, counts[i * per_model : (i + 1) * per_model], strict=True))
            for i, key in enumerate(keys)
        }

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def _follow_health(self) -> None:
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        async for snap in self.core.watch():
            for model in snap.models:
                key = (model.name, model.version)
                await self.health.set(f"{model.name}/{model.version}", serving if key in snap.ready else not_serving)

    async def start(self) -> None:
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self._health_task = asyncio.create_task(self._follow_health())
        await self.server.start()
        if self.settings.metrics_port:
            self._metrics_server = MetricsServer(
                self.metrics.registry, self.settings.metrics_port, self.settings.metrics_host
            )
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
        if self._health_task is not None:
            self._health_task.cancel()
        await self.health.enter_graceful_shutdown()
        if self._metrics_server is not None:
            self._metrics_server.stop()
        if self._queues is not None:
            self._queues.close()
        await self.server.stop(grace_s)
