"""The worker's core: the parts that serve one device, put together.

One worker process serves one device. It holds every model the router assigns it,
blocks on the models' wake lists (never polls), claims a batch with one atomic
script, runs it on ONNX Runtime (on the event loop's own thread when the model is
quick, else on a task and thread of its own while the loop serves other models and
extends the batch's leases),
then writes replies and acks the lease in one pipelined round trip.

The parts, each owning its state: ``held`` (the models held and claimed from),
``serve_loop`` (the wait for work), ``runner`` (claim, fill, run one batch),
``compute`` (the run pool, its ONNX Runtime threads and time limits), ``leases`` (extend, release,
reply and ack, reap), ``health`` (canary, failure counting), ``assignment``
(loads and drains what the router assigns) and ``reporter`` (reports to the router).
``Worker`` builds them, wires their callbacks and owns the stop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import grpc
from opentelemetry import trace
from redis.exceptions import RedisError

from meshserve.observe.metrics import WorkerMetrics, WorkerReads
from meshserve.queue import QueueProtocol
from meshserve.settings import WorkerSettings
from meshserve.store.link import RedisLink
from model_workers.assignment import AssignmentFollower
from model_workers.compute import Compute
from model_workers.devices import monitor_for
from model_workers.health import ModelHealth
from model_workers.held import HeldModels, ModelKey
from model_workers.leases import Leases
from model_workers.memory import describe_device, probe_for
from model_workers.reporter import Reporter
from model_workers.runner import BatchRunner
from model_workers.serve_loop import ServeLoop
from model_workers.served import ModelStats, Served
from protos import meshserve_pb2_grpc as mpb_grpc

__all__ = ["ModelStats", "Worker"]

ROUTER_WAIT_AT_START_S = 30.0
"""How long a starting worker waits for the router to answer its first report."""


class Worker:
    """A worker's plain core. The server runs ``serve``, ``report_forever``,
    ``reap_forever`` and ``canary_forever`` as its tasks; ``stop`` drains them."""

    def __init__(
        self,
        settings: WorkerSettings,
        redis: RedisLink,
        blocking_redis: RedisLink,
        router: mpb_grpc.RouterStub,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.worker_id = settings.worker_id
        self.on_readiness_change: Callable[[], None] = lambda: None  # set by the server: health entries follow
        self._stopping = asyncio.Event()
        self._queue = QueueProtocol(redis)
        self.held = HeldModels()
        self.compute = Compute(settings.compute_slots)
        self.leases = Leases(settings, redis, self._queue, self.held, self._stopping)
        self.health = ModelHealth(settings, self.held, self.compute, self._stopping, self._health_changed)
        self.metrics = WorkerMetrics.create(
            WorkerReads(
                models=self.held.counters,
                tenant_device_seconds=lambda: self.runner.tenant_device_seconds(),
                devices=lambda: (self.reporter.device_sample,),
                engines=self.held.engines,
                device=settings.device,
                price_per_device_hour=settings.price_per_device_hour,
            )
        )
        self.runner = BatchRunner(
            settings,
            self._queue,
            blocking_redis,
            self.leases,
            self.compute,
            self.health,
            self.metrics,
            self._stopping,
            tracer or trace.NoOpTracer(),
        )
        self.serve_loop = ServeLoop(
            self.worker_id, self._queue, blocking_redis, self.held, self.runner, self.leases, self._stopping
        )
        self.runner.on_batch_ended = self.serve_loop.batch_ended
        self.assignment = AssignmentFollower(
            settings,
            self.held,
            probe_for(settings.device),
            self.serve_loop,
            self.leases,
            self._stopping,
            self._readiness_changed,
            self._report_quietly,
        )
        self.reporter = Reporter(
            settings,
            router,
            self.held,
            self.assignment,
            # for the router's placement
            describe_device(settings.device, budget_bytes=settings.memory_budget_mb * 2**20),
            monitor_for(settings.device, self.held.busy_seconds),
            self._stopping,
        )

    @property
    def served(self) -> dict[ModelKey, Served]:
        """The held model versions (read only: the assignment follower changes them)."""
        return self.held.served

    @property
    def idle(self) -> asyncio.Event:
        """Set while the serve loop blocks for work."""
        return self.serve_loop.idle

    @property
    def draining(self) -> bool:
        """Whether ``stop`` has begun: no more work is taken."""
        return self._stopping.is_set()

    def readiness(self) -> dict[ModelKey, bool]:
        """Each held model version: whether it is in service (warm, healthy, not being
        dropped); an assigned one whose load failed: False."""
        return {**dict.fromkeys(self.assignment.failures(), False), **self.held.readiness()}

    # ------------------------------------------------------------ the server's tasks

    async def load_assigned(self) -> None:
        """Ask the router what to hold; return once each model has loaded (or failed to)."""
        with contextlib.suppress(RedisError):  # Redis down now: the first ack loads it later
            await self._queue.load_ack_script()
        # The router may still be starting (under `up`, or beside us in a cluster):
        # wait for its channel instead of failing on the first refused connection.
        await self.reporter.report(ROUTER_WAIT_AT_START_S, wait_for_router=True)
        await self.assignment.loaded()
        await self.reporter.report()

    async def serve(self) -> None:
        """The serve loop (``ServeLoop.run``), until ``stop``; then the batches still
        computing on tasks of their own, until answered."""
        try:
            await self.serve_loop.run()
        finally:
            await self.runner.running()

    async def report_forever(self) -> None:
        """The heartbeat to the router (``Reporter.report_forever``), until ``stop``."""
        await self.reporter.report_forever()

    async def reap_forever(self) -> None:
        """The sweep of expired leases (``Leases.reap_forever``), until ``stop``."""
        await self.leases.reap_forever()

    async def canary_forever(self) -> None:
        """The canaries (``ModelHealth.canary_forever``); the server cancels it on stop."""
        await self.health.canary_forever()

    # ------------------------------------------------------------ lifecycle

    async def stop(self) -> None:
        """Stop taking work, finish the batch in hand, flush replies and acks."""
        self._stopping.set()
        self.serve_loop.interrupt()
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self.reporter.report()

    async def close(self) -> None:
        """After ``stop`` and the serve loop's end: end loads and drops, flush replies."""
        await self.assignment.close()
        await self.leases.flushed()
        await self.reporter.flushed()
        await self.serve_loop.close()
        # off the loop: a stream's thread still running (its task was cancelled) writes
        # its next response through the loop before it sees the stop and ends
        await asyncio.to_thread(self.compute.close)
        for served in self.held.served.values():  # after the last run: a Python model's processes end
            await asyncio.to_thread(served.model.close)

    # ------------------------------------------------------------ wiring

    def _readiness_changed(self) -> None:
        self.on_readiness_change()

    def _health_changed(self) -> None:
        """A model went in or out of service: health entries and the router follow."""
        self.on_readiness_change()
        self.reporter.report_soon()

    async def _report_quietly(self) -> None:
        await self.reporter.report_quietly()
