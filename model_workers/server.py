"""The worker process: Redis clients, router channel, and the core's tasks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import replace

import grpc
from opentelemetry import trace

from meshserve import metrics
from meshserve.redis_client import blocking_client, command_client
from meshserve.settings import WorkerSettings, instance_id
from model_workers.worker import Worker
from protos import meshserve_pb2_grpc as mpb_grpc

log = logging.getLogger(__name__)


class WorkerServer:
    """Owns one worker: ``start`` loads and warms up, then serves until ``stop``."""

    def __init__(self, settings: WorkerSettings, tracer: trace.Tracer | None = None) -> None:
        if not settings.worker_id:
            settings = replace(settings, worker_id=instance_id(f"worker-{settings.device}"))
        self.settings = settings
        self.redis = command_client(settings.redis_url)
        self.blocking = blocking_client(settings.redis_url)
        self.router_channel = grpc.aio.insecure_channel(settings.router_address)
        self.worker = Worker(settings, self.redis, self.blocking, mpb_grpc.RouterStub(self.router_channel), tracer)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.worker.load_assigned()
        if self.settings.metrics_port:
            metrics.serve(self.worker.metrics.registry, self.settings.metrics_port)
        self._tasks = [
            asyncio.create_task(self.worker.serve(), name="serve"),
            asyncio.create_task(self.worker.report_forever(1.0), name="report"),
            asyncio.create_task(self.worker.reap_forever(), name="reaper"),
        ]
        log.info("worker %s serving %d model versions", self.settings.worker_id, len(self.worker.served))

    async def wait(self) -> None:
        await asyncio.gather(*self._tasks)

    async def stop(self) -> None:
        """Stop taking batches, finish the one in hand, flush replies and acks, close."""
        await self.worker.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks)
        await self.worker.close()
        await self.router_channel.close()
        await self.redis.aclose()
        await self.blocking.aclose()
