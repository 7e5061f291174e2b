"""The worker process: Redis clients, router channel, health server, and the core's tasks.

The worker serves grpc.health.v1 (no inference: that arrives through Redis): the
overall status "" is SERVING while it takes work, and each held model version
has its own entry, "<model>/<version>": SERVING once the model has loaded, warmed
up and passed its sanity check, NOT_SERVING while its canary (or a run of failed
batches) says it is broken, SERVING again when a canary passes. The router may
move models on and off the worker while it runs: a model being loaded has no
entry yet; one being dropped turns NOT_SERVING while its last batch finishes,
then SERVICE_UNKNOWN once its session is gone (what a watcher of a name the
server never knew gets; grpcio-health cannot remove an entry). On stop, every
entry turns NOT_SERVING before the worker stops taking batches, so an
orchestrator sees the drain first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import replace

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import trace
from redis.exceptions import RedisError

from meshserve.observe.metrics import MetricsServer
from meshserve.platform.balancing import ROUTER_CHANNEL_OPTIONS
from meshserve.platform.tls import add_port, channel
from meshserve.settings import WorkerSettings, instance_id
from meshserve.store.clients import blocking_link, command_link
from meshserve.store.memory import EvictionPolicyError, policy_check
from model_workers.worker import Worker
from protos import meshserve_pb2_grpc as mpb_grpc

log = logging.getLogger(__name__)


class WorkerServer:
    """Owns one worker: ``start`` loads and warms up, then serves until ``stop``."""

    def __init__(self, settings: WorkerSettings, tracer: trace.Tracer | None = None) -> None:
        if not settings.worker_id:
            settings = replace(settings, worker_id=instance_id(f"worker-{settings.device}"))
        self.settings = settings
        check = policy_check(allow_eviction=settings.allow_eviction, service="worker")
        self.redis = command_link(settings.redis_url, name="meshserve-worker", check=check)
        self.blocking = blocking_link(settings.redis_url, name="meshserve-worker-wait", check=check)
        self.router_channel = channel(settings.router_address, settings.tls, ROUTER_CHANNEL_OPTIONS)
        self.worker = Worker(settings, self.redis, self.blocking, mpb_grpc.RouterStub(self.router_channel), tracer)
        self.worker.on_readiness_change = self._schedule_health_update
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.health_port = add_port(self.server, f"{settings.health_host}:{settings.health_port}", settings.tls)
        self.tasks: dict[str, asyncio.Task[None]] = {}  # the core's long-running tasks, by name
        self._health_updates: set[asyncio.Task[None]] = set()
        self._health_lock = asyncio.Lock()  # updates in order: the last one sees the latest state
        self._model_entries: set[str] = set()
        self._metrics_server: MetricsServer | None = None

    @property
    def health_address(self) -> str:
        return f"{self.settings.health_host}:{self.health_port}"

    def _schedule_health_update(self) -> None:
        task = asyncio.create_task(self._update_health())
        self._health_updates.add(task)
        task.add_done_callback(self._health_updates.discard)

    async def _update_health(self) -> None:
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        async with self._health_lock:
            readiness = self.worker.readiness()
            entries = {f"{name}/{version}": ready for (name, version), ready in readiness.items()}
            for gone in sorted(self._model_entries - entries.keys()):
                await self.health.set(gone, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            self._model_entries = set(entries)
            for entry, ready in entries.items():
                await self.health.set(entry, serving if ready else not_serving)
            overall = any(readiness.values()) and not self.worker.draining
            await self.health.set("", serving if overall else not_serving)

    async def start(self) -> None:
        await self._check_redis()
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        await self.worker.load_assigned()
        await self._update_health()
        if self.settings.metrics_port:
            try:
                self._metrics_server = MetricsServer(
                    self.worker.metrics.registry, self.settings.metrics_port, self.settings.metrics_host
                )
            except OSError as exc:  # metrics must never take a serving worker down
                log.error("metrics port %d unavailable (%s); serving without /metrics", self.settings.metrics_port, exc)
        self.tasks = {
            "serve": asyncio.create_task(self.worker.serve(), name="serve"),
            "report": asyncio.create_task(self.worker.report_forever(), name="report"),
            "reaper": asyncio.create_task(self.worker.reap_forever(), name="reaper"),
            "canary": asyncio.create_task(self.worker.canary_forever(), name="canary"),
        }
        log.info(
            "worker %s serving %d model versions; health on %s%s",
            self.settings.worker_id,
            len(self.worker.served),
            self.health_address,
            f"; /metrics on {self.settings.metrics_host}:{self.settings.metrics_port}" if self._metrics_server else "",
        )

    async def _check_redis(self) -> None:
        """Refuse to start on a Redis that may evict (``EvictionPolicyError``); an
        unreachable one is only logged: the links reconnect, checking it again."""
        try:
            await self.redis.execute("PING")
        except EvictionPolicyError:
            raise
        except RedisError as exc:
            log.warning("redis unavailable at start (%s): serving once it is back", exc)

    async def wait(self) -> None:
        await asyncio.gather(*self.tasks.values())

    async def stop(self) -> None:
        """NOT_SERVING first; then stop taking batches, give back any not started,
        flush replies and acks, and close."""
        await self.health.enter_graceful_shutdown()
        await self.worker.stop()
        if (canary := self.tasks.get("canary")) is not None:  # a canary in flight is not worth waiting for
            canary.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self.tasks.values())
        await self.worker.close()
        await self.router_channel.close()
        await self.redis.aclose()
        await self.blocking.aclose()
        await self.server.stop(0)
        if self._metrics_server is not None:
            self._metrics_server.stop()
