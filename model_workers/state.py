"""What the worker's parts share: the models held, the tasks owned, the serve loop's wake.

``WorkerState`` builds every attribute that the parts (``Leases``, ``Placement``,
``Health`` and the serve loop in ``Worker``) read and write, and holds the few
helpers they all call. The metrics endpoint reads the held models' counters here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from opentelemetry import trace
from redis.exceptions import RedisError

from meshserve.observe.metrics import LabelMemo, ModelCounters, WorkerMetrics, WorkerReads
from meshserve.observe.tracing import records, tenant_attribute
from meshserve.queue import ModelKeys, QueueProtocol, worker_wake_key
from meshserve.settings import WorkerSettings
from meshserve.store.link import RedisLink
from model_workers.devices import monitor_for
from model_workers.memory import describe_device, probe_for
from model_workers.served import Served
from protos import meshserve_pb2_grpc as mpb_grpc

log = logging.getLogger(__name__)

WAKE_SAFETY_TIMEOUT_S = 5.0
"""Blocking waits re-check every queue after this long, in case a wake token was lost."""

REPORT_INTERVAL_S = 1.0
"""Heartbeat interval until the router's answer says otherwise (``report_interval_ms``)."""


class WorkerState:
    """The state a worker's parts share; ``model_workers.worker.Worker`` puts the parts together."""

    def __init__(
        self,
        settings: WorkerSettings,
        redis: RedisLink,
        blocking_redis: RedisLink,
        router: mpb_grpc.RouterStub,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.settings = settings
        self.tenant_device_seconds: defaultdict[tuple[str, str], float] = defaultdict(float)  # (tenant, model)
        self.worker_id = settings.worker_id
        self.redis = redis
        self.blocking = blocking_redis
        self.queue = QueueProtocol(redis)
        self.router = router
        self.tracer = tracer or trace.NoOpTracer()
        self.tracing = records(self.tracer)
        self._tenant_on_span = tenant_attribute(settings.trace_tenant, settings.trace_tenant_secret)
        self.served: dict[tuple[str, int], Served] = {}
        self._by_wake: dict[str, Served] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ort")
        self._device = asyncio.Lock()  # held by every model run: a batch or a canary, never both at once
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load")  # loads never wait on batches
        self._wake_self = worker_wake_key(self.worker_id)
        self._known_keys: dict[str, ModelKeys] = {}  # wake key -> keys, of every model ever served
        self._assigned: frozenset[tuple[str, int]] = frozenset()
        self._loading: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._dropping: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._load_failed_at_s: dict[tuple[str, int], float] = {}  # monotonic clock
        self._reports_sent = 0
        self._applied_report = 0  # the report whose answer was applied last
        self._rescan = False  # a model was added: look at every queue before waiting
        self._last_woken: Served | None = None  # the model of the last wake-up: claimed for right after the next
        self.report_interval_s = REPORT_INTERVAL_S
        self._reply_tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._blocked: asyncio.Task[Any] | None = None
        self.idle = asyncio.Event()  # set while the serve loop blocks for work
        self.on_readiness_change: Callable[[], None] = lambda: None
        self.draining = False
        self.device_monitor = monitor_for(settings.device, self._busy_seconds)
        self.device_description = describe_device(settings.device)  # for the router's placement
        self.memory_probe = probe_for(settings.device)
        self.activation_bytes: dict[tuple[str, int], int] = {}  # measured at warm-up; 0: not measured
        self.device_sample = self.device_monitor.sample()
        self._labelled = LabelMemo()
        self.metrics = WorkerMetrics.create(
            WorkerReads(
                models=self.counters,
                tenant_device_seconds=lambda: dict(self.tenant_device_seconds),
                devices=lambda: (self.device_sample,),
                device=settings.device,
                price_per_device_hour=settings.price_per_device_hour,
            )
        )

    def counters(self) -> list[ModelCounters]:
        """Every held model's counters, for the metrics endpoint."""
        return [
            ModelCounters(
                name,
                version,
                s.stats.batches,
                s.stats.items,
                s.stats.requests,
                s.stats.expired,
                s.stats.failed,
                s.stats.device_seconds,
                s.weights_bytes,
            )
            for (name, version), s in self.served.items()
        ]

    def _busy_seconds(self) -> float:
        return sum(s.stats.device_seconds for s in self.served.values())

    def _claims(self, served: Served) -> bool:
        """Whether the serve loop takes work for ``served`` (False once it is being dropped)."""
        return self._by_wake.get(served.keys.wake) is served

    def _track(self, task: asyncio.Task[None]) -> None:
        self._reply_tasks.add(task)
        task.add_done_callback(self._reply_tasks.discard)

    def _wake_serve_loop(self) -> None:
        """End the serve loop's wait, if it is waiting, so it waits on the current models.

        Otherwise nothing is needed: it rebuilds its key list before the next wait.
        A token that lands just as a wait ends for another reason costs one extra
        turn of the loop; ``close`` deletes the list.
        """
        if self._blocked is not None:
            self._track(asyncio.create_task(self._push_self_wake()))

    async def _push_self_wake(self) -> None:
        try:
            await self.queue.wake_worker(self.worker_id)
        except RedisError as exc:
            log.warning("could not wake the serve loop (%s); it looks again within %.0f s", exc, WAKE_SAFETY_TIMEOUT_S)

    async def _report_quietly(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self.report()

    async def report(self) -> None:
        """Report to the router and follow its answer (``Placement.report``)."""
        raise NotImplementedError
