"""The router process: gRPC server, health, metrics, and the core's expiry task."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from meshserve.observe.metrics import MetricsServer, RouterMetrics, RouterReads
from meshserve.platform.tls import add_port
from meshserve.settings import RouterSettings, instance_id
from protos import meshserve_pb2_grpc as mpb_grpc
from router.core import RouterCore
from router.depths import QueueDepths
from router.leader import Leadership
from router.lifecycle import POLL, RepositoryManager
from router.placement import ModelKey
from router.scaler import SCALER_SERVICE_NAME, PoolReader, add_scaler_to_server
from router.servicer import RouterServicer
from router.statistics import StatisticsCollector

log = logging.getLogger(__name__)


class RouterServer:
    """Owns the router's gRPC server and its expiry task."""

    def __init__(self, settings: RouterSettings, on_deposed: Callable[[], None] | None = None) -> None:
        """``on_deposed``: what a leader does when it loses the lease (default: SIGTERM
        to itself, so its clients' connections close and they reconnect to the new
        leader through the Service)."""
        self.settings = settings
        if settings.leader_lease_ms and not settings.redis_url:
            raise ValueError("--leader-lease-ms needs --redis-url (MESHSERVE_REDIS_URL): the lease lives in Redis")
        self._on_deposed = on_deposed or (lambda: os.kill(os.getpid(), signal.SIGTERM))
        self.leadership = (
            Leadership(settings.redis_url, instance_id("router"), settings.leader_lease_ms, self._lead)
            if settings.leader_lease_ms and settings.redis_url
            else None
        )
        self.depths = QueueDepths(settings.redis_url, allow_eviction=settings.allow_eviction)
        # what is served, by control mode; a version that exists but cannot be served
        # stays known, reported failed with its problem
        self.repository = RepositoryManager(
            settings.model_repository,
            mode=settings.model_control_mode,
            load=settings.load_model,
            managed=settings.managed_repository,
            depths=self.depths,
            drain_s=settings.unload_drain_s,
            max_upload_bytes=settings.max_upload_bytes,
            remote=settings.repository_uri,
        )
        self.core = RouterCore(
            self.repository.table_models(),
            worker_ttl_ms=settings.worker_ttl_ms,
            headroom_ratio=settings.placement_headroom_ratio,
            unservable=self.repository.unservable(),
            min_residency_s=settings.min_residency_s,
            ensembles=self.repository.ensembles(),
        )
        self.repository.bind(self.core)
        # RepositoryModelLoad carries model files: room for them, and for the rest of the message
        limit = settings.max_upload_bytes + 1024 * 1024
        self.server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit)])
        servicer = RouterServicer(self.core, settings.model_repository, settings.report_interval_ms, self.repository)
        mpb_grpc.add_RouterServicer_to_server(servicer, self.server)
        # grpc.health.v1: "" for the router itself, "<model>/<version>" for whether any
        # live worker serves that model version (the routing table's readiness).
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._health_task: asyncio.Task[None] | None = None
        self.port = add_port(self.server, f"{settings.host}:{settings.port}", settings.tls)
        self._expiry: asyncio.Task[None] | None = None
        self._poll: asyncio.Task[None] | None = None
        self._queues: asyncio.Task[None] | None = None
        self.core.read_queued = self._read_queued
        self.depths.partitions = self._partitions_of  # every depth read sums a model's queue partitions
        # KEDA's external scaler (router/scaler.py): worker pools scale on their queue depth
        add_scaler_to_server(self.server, PoolReader(self.depths, lambda: self.core.models, self.core.load_rates))
        self.metrics = RouterMetrics.create(
            RouterReads(
                ready=self.core.readiness,
                depths=self._queue_depths,
                loads=self.core.load_rates,
                unplaceable=self.core.unplaceable,
                load_failures=self.core.load_failures,
                residency=self.core.residency_figures,
            )
        )
        self.metrics.registry.register(StatisticsCollector(servicer.statistics, lambda: list(self.core.models)))
        self._metrics_server: MetricsServer | None = None

    def _partitions_of(self, key: ModelKey) -> int:
        """A model version's queue partitions (1 for one the router no longer knows)."""
        model = self.core.models.get(key)
        return model.queue_partitions if model is not None else 1

    def _queue_depths(self) -> dict[ModelKey, dict[str, int]]:
        """Called in the metrics thread at scrape time."""
        return self.depths.read(self.core.models)

    async def _read_queued(self) -> frozenset[ModelKey]:
        """The model versions with requests waiting in Redis now (none without Redis)."""
        depths = await asyncio.to_thread(self.depths.read, list(self.core.models))
        return frozenset(key for key, tiers in depths.items() if any(tiers.values()))

    async def _follow_queues(self, interval_s: float) -> None:
        """While some model is evicted, which models have requests queued (one read of
        the depths per interval): those stay resident, or are placed again
        (``RouterCore.note_queued``)."""
        while True:
            await asyncio.sleep(interval_s)
            if not self.core.snapshot().evicted:
                self.core.queued = frozenset()
                continue
            await self.core.note_queued(await self._read_queued())

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def _follow_health(self) -> None:
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        async for snap in self.core.watch():
            for model in snap.models:
                key = (model.name, model.version)
                await self.health.set(f"{model.name}/{model.version}", serving if key in snap.ready else not_serving)

    async def _lead(self, leading: bool) -> None:
        """Leadership changed: only the leader is ready; a deposed leader goes."""
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        if leading:  # no worker has reported here yet: each will within an interval
            self.core.hold_unready_tables(2 * self.settings.report_interval_ms / 1000)
        await self.health.set("", serving if leading else not_serving)
        if not leading:
            self._on_deposed()

    async def start(self) -> None:
        await asyncio.to_thread(self.depths.check)
        await self.health.set(SCALER_SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        if self.leadership is None:
            await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        else:
            await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            self.leadership.start()
        self._health_task = asyncio.create_task(self._follow_health())
        await self.server.start()
        if self.settings.metrics_port:
            self._metrics_server = MetricsServer(
                self.metrics.registry, self.settings.metrics_port, self.settings.metrics_host
            )
        self._expiry = asyncio.create_task(self.core.run_expiry(self.settings.report_interval_ms / 1000))
        if self.settings.model_control_mode == POLL:
            self._poll = asyncio.create_task(self.repository.run_poll(self.settings.repository_poll_s))
        self._queues = asyncio.create_task(self._follow_queues(self.settings.report_interval_ms / 1000))
        log.info(
            "router listening on %s%s with %d model versions%s",
            self.address,
            " (mutual TLS)" if self.settings.tls else "",
            len(self.core.models),
            f"; /metrics on {self.settings.metrics_host}:{self.settings.metrics_port}" if self._metrics_server else "",
        )

    async def stop(self, grace_s: float = 1.0) -> None:
        if self.leadership is not None:
            self._on_deposed = lambda: None  # stepping down on purpose
            await self.leadership.stop()
        if self._expiry is not None:
            self._expiry.cancel()
        if self._poll is not None:
            self._poll.cancel()
        if self._queues is not None:
            self._queues.cancel()
        if self._health_task is not None:
            self._health_task.cancel()
        await self.health.enter_graceful_shutdown()
        if self._metrics_server is not None:
            self._metrics_server.stop()
        self.depths.close()
        await self.server.stop(grace_s)
