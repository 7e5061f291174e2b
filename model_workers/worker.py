"""The worker's core: block for work, claim a batch, run it, reply, ack.

One worker process serves one device. It holds every model the router assigns it,
blocks on the models' wake lists (never polls), claims a batch with one atomic
script, runs it on ONNX Runtime in a thread (the event loop stays free to write
the previous batch's replies), then writes replies and acks the lease in one
pipelined round trip.

Batching policy: a lone request on an idle worker runs at once. When a claim
finds several requests but fewer than the max batch, the worker waits up to the
model's max queue delay, counted from the oldest request's arrival, for more
same-shaped requests. Under load requests are already older than the delay, so
batches form from what queued during the previous compute, with no added wait.

Live placement: every report's answer is the router's current assignment, and the
worker follows it (``_apply``). A newly assigned model loads and warms up in a
loader thread of its own (serving the others goes on meanwhile) and is claimed
from, and reported ready, only once warm. A model no longer assigned is drained:
it is claimed from no more at once (its health entry and report say not ready),
the batch in hand finishes and its replies are written, then the session goes.
A model that fails to load is logged and tried again only after
``LOAD_RETRY_AFTER_S`` while it stays assigned, or at once when the router
assigns it afresh after taking it away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.util.types import AttributeValue
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from meshserve.codec import from_array, to_array
from meshserve.metrics import ModelCounters, WorkerMetrics, WorkerReads
from meshserve.queue import REPLY_TTL_S, ClaimedBatch, ModelKeys, QueueProtocol, worker_wake_key
from meshserve.repository import ModelInfo, load_model
from meshserve.settings import WorkerSettings
from meshserve.telemetry import extract, tenant_attribute
from model_workers.devices import monitor_for
from model_workers.memory import describe_device, probe_for, warm_up_measured
from model_workers.session import LoadedModel, SanityCheckFailed
from protos import meshserve_pb2 as mpb
from protos import meshserve_pb2_grpc as mpb_grpc

log = logging.getLogger(__name__)

WAKE_SAFETY_TIMEOUT_S = 5.0
"""Blocking waits re-check every queue after this long, in case a wake token was lost."""

COMPUTE_AVERAGE_WEIGHT = 0.2
"""Weight of the newest batch in a model's moving average of compute time."""

ROUTER_WAIT_AT_START_S = 30.0
"""How long a starting worker waits for the router to answer its first report."""

REPORT_INTERVAL_S = 1.0
"""Heartbeat interval until the router's answer says otherwise (``report_interval_ms``)."""

LOAD_RETRY_AFTER_S = 60.0
"""A model that failed to load is tried again after this long if still assigned,
not at every heartbeat: a broken model file would otherwise load in a loop."""

FAILURES_BEFORE_NOT_READY = 3
"""Consecutive failed batches after which a model is reported not ready.

Only a passing canary (``Worker.canary_forever``) brings it back."""


@dataclass(slots=True)
class ModelStats:
    """Counters of one model version on this worker (also exported as metrics)."""

    batches: int = 0
    items: int = 0
    requests: int = 0
    expired: int = 0
    failed: int = 0
    redelivered: int = 0
    largest_batch: int = 0
    device_seconds: float = 0.0  # time the device spent running this model's batches
    queue_wait_seconds: float = 0.0  # summed over requests, enqueue to claim


@dataclass(slots=True)
class _Served:
    model: LoadedModel
    keys: ModelKeys
    stats: ModelStats = field(default_factory=ModelStats)
    consecutive_failures: int = 0
    canary_failing: bool = False  # the last canary failed (logged at error once per outage)
    weights_bytes: int = 0
    idle: asyncio.Event = field(default_factory=lambda: _set(asyncio.Event()))  # clear while a batch is in hand
    compute_ms_avg: float = 0.0  # moving average of a batch's ONNX Runtime time

    def batch_ms(self) -> int:
        """How long a batch of this model is expected to take: claims skip jobs due sooner."""
        return int(self.compute_ms_avg)

    def observe_compute(self, compute_ms: float) -> None:
        self.compute_ms_avg += COMPUTE_AVERAGE_WEIGHT * (compute_ms - self.compute_ms_avg)


@dataclass(slots=True)
class _Job:
    job_id: str
    token: int
    request: mpb.QueuedRequest
    batch_size: int


class Worker:
    """A worker's plain core. ``run`` owns the serve loop; ``stop`` drains it."""

    def __init__(
        self,
        settings: WorkerSettings,
        redis: Redis,
        blocking_redis: Redis,
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
        self._tenant_on_span = tenant_attribute(settings.trace_tenant, settings.trace_tenant_secret)
        self.served: dict[tuple[str, int], _Served] = {}
        self._by_wake: dict[str, _Served] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ort")
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

    # ------------------------------------------------------------ lifecycle

    async def load_assigned(self) -> None:
        """Ask the router what to hold; return once each model has loaded (or failed to)."""
        with contextlib.suppress(RedisError):  # Redis down now: the first ack loads it later
            await self.queue.load_ack_script()
        # The router may still be starting (under `up`, or beside us in a cluster):
        # wait for its channel instead of failing on the first refused connection.
        sequence = self._reports_sent = self._reports_sent + 1
        assignment = await self.router.ReportWorker(self._report(), timeout=ROUTER_WAIT_AT_START_S, wait_for_ready=True)
        self._apply(assignment, sequence)
        while self._loading:
            await asyncio.gather(*self._loading.values())
        await self.report()

    def _apply(self, assignment: mpb.WorkerAssignment, sequence: int) -> None:
        """Follow the router's assignment: start loading what is new, draining what is gone.

        Only starts tasks (the worker owns them; ``close`` ends them). Reports can
        overlap, so the answer to a report older than the last one applied is ignored.
        """
        if sequence <= self._applied_report or self._stopping.is_set():
            return
        self._applied_report = sequence
        if assignment.report_interval_ms > 0:
            self.report_interval_s = assignment.report_interval_ms / 1000
        assigned = frozenset((spec.name, spec.version) for spec in assignment.models)
        for key in self._assigned - assigned:
            self._load_failed_at_s.pop(key, None)  # assigned afresh later: tried at once
        self._assigned = assigned
        now_s = time.monotonic()
        for key in sorted(assigned):
            failed_at_s = self._load_failed_at_s.get(key)
            if key in self.served or key in self._loading:
                continue
            if failed_at_s is not None and now_s - failed_at_s < LOAD_RETRY_AFTER_S:
                continue
            self._load_failed_at_s.pop(key, None)
            self._loading[key] = asyncio.create_task(self._load_and_serve(key), name=f"load {key[0]}/{key[1]}")
        dropped = [(key, s) for key, s in self.served.items() if key not in assigned and self._claims(s)]
        for key, served in dropped:
            del self._by_wake[served.keys.wake]  # no claim of it from now on
            self._dropping[key] = asyncio.create_task(self._drop(key, served), name=f"drop {key[0]}/{key[1]}")
        if dropped:
            self._wake_serve_loop()
            self.on_readiness_change()

    def _claims(self, served: _Served) -> bool:
        """Whether the serve loop takes work for ``served`` (False once it is being dropped)."""
        return self._by_wake.get(served.keys.wake) is served

    def readiness(self) -> dict[tuple[str, int], bool]:
        """Each held model version: whether it is in service (warm, healthy, not being dropped)."""
        return {key: s.model.ready and self._claims(s) for key, s in self.served.items()}

    async def _load_and_serve(self, key: tuple[str, int]) -> None:
        """Load and warm ``key`` up in the loader thread, then serve it and report it ready."""
        name, version = key
        try:
            model = await asyncio.get_running_loop().run_in_executor(self._loader, self._load, name, version)
        except Exception:
            log.exception(
                "model %s version %d failed to load; not serving it (tried again in %.0f s if still assigned)",
                name,
                version,
                LOAD_RETRY_AFTER_S,
            )
            self._load_failed_at_s[key] = time.monotonic()
            return
        finally:
            self._loading.pop(key, None)
        if self._stopping.is_set() or key not in self._assigned:
            log.info("model %s version %d loaded but no longer assigned; not serving it", name, version)
            self.activation_bytes.pop(key, None)
            return
        served = _Served(model, ModelKeys.for_model(name, version), weights_bytes=model.info.weights_bytes)
        self.served[key] = served
        self._by_wake[served.keys.wake] = served
        self._known_keys[served.keys.wake] = served.keys
        self._rescan = True  # jobs may have queued while it loaded
        self._wake_serve_loop()
        self.on_readiness_change()
        await self._report_quietly()

    async def _drop(self, key: tuple[str, int], served: _Served) -> None:
        """Drain a model no longer assigned (already claimed from no more): let the batch
        in hand finish and its replies be written, then let the session go and report."""
        try:
            await served.idle.wait()
            if self._reply_tasks:
                await asyncio.gather(*list(self._reply_tasks), return_exceptions=True)
            del self.served[key]
            self.activation_bytes.pop(key, None)
        finally:
            self._dropping.pop(key, None)
        log.info("dropped model %s version %d: the router placed it elsewhere", *key)
        self.on_readiness_change()
        await self._report_quietly()

    def _load(self, name: str, version: int) -> LoadedModel:
        """Read, load and warm up one model version; runs in the loader thread."""
        info = load_model(self.settings.model_repository / name, version)
        model = LoadedModel(
            info,
            device=self.settings.device,
            intra_op_threads=self.settings.intra_op_threads,
            spinning=self.settings.intra_op_spinning,
        )
        took_s, activation_bytes = warm_up_measured(model, self.memory_probe)
        self.activation_bytes[(info.name, info.version)] = activation_bytes
        log.info("loaded %s version %d, warm-up %.0f ms", info.name, info.version, took_s * 1000)
        return model

    def _report(self) -> mpb.WorkerReport:
        return mpb.WorkerReport(
            worker_id=self.worker_id,
            device=self.settings.device,
            device_kind=self.device_description.kind,
            device_profile=self.device_description.profile,
            device_memory_bytes=self.device_description.memory_bytes,
            draining=self.draining,
            models=[
                mpb.ModelState(
                    name=name,
                    version=version,
                    ready=s.model.ready and self._claims(s),
                    items_total=s.stats.items,
                    requests_total=s.stats.requests,
                    device_seconds_total=s.stats.device_seconds,
                    queue_wait_seconds_total=s.stats.queue_wait_seconds,
                    weights_bytes=s.weights_bytes,
                    activation_bytes=self.activation_bytes.get((name, version), 0),
                )
                for (name, version), s in self.served.items()
            ],
        )

    async def report(self) -> None:
        """Report to the router, and follow the assignment it answers with."""
        sequence = self._reports_sent = self._reports_sent + 1
        assignment = await self.router.ReportWorker(self._report(), timeout=5)
        self._apply(assignment, sequence)

    async def report_forever(self) -> None:
        """Heartbeat to the router every ``report_interval_s``; a router outage is
        logged, never fatal."""
        while not self._stopping.is_set():
            self.device_sample = self.device_monitor.sample()
            try:
                await self.report()
            except grpc.aio.AioRpcError as exc:
                log.warning("router unreachable (%s); serving on", exc.code().name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.report_interval_s)

    async def stop(self) -> None:
        """Stop taking work, finish the batch in hand, flush replies and acks."""
        self.draining = True
        self._stopping.set()
        if self._blocked is not None:
            self._blocked.cancel()
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self.report()

    async def close(self) -> None:
        """After ``stop`` and the serve loop's end: end loads and drops, flush replies."""
        changes = [*self._loading.values(), *self._dropping.values()]
        for task in changes:
            task.cancel()
        await asyncio.gather(*changes, return_exceptions=True)
        if self._reply_tasks:
            await asyncio.gather(*self._reply_tasks, return_exceptions=True)
        with contextlib.suppress(RedisError):
            await self.redis.delete(self._wake_self)
        self._executor.shutdown(wait=True)
        self._loader.shutdown(wait=False, cancel_futures=True)  # a load in progress ends on its own

    async def canary_forever(self) -> None:
        """Run every held model's known sample input each ``canary_interval_s``.

        A canary that raises, outlasts a lease or answers NaN or Inf takes its model
        out of service; a later one that passes brings it back, which is also the
        only way back for a model taken out by failed batches. Canaries run in the
        worker's one ONNX Runtime thread, so they queue behind a computing batch and
        never run beside one: one batch-1 run per model per interval. The task is
        owned by the worker's server, which cancels it on stop.
        """
        interval_s = self.settings.canary_interval_s
        if interval_s <= 0:
            return
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval_s)
            for served in list(self.served.values()):
                if self._stopping.is_set():
                    return
                if self._claims(served):  # not one being dropped
                    await self._canary(served)

    async def _canary(self, served: _Served) -> None:
        info = served.model.info
        try:
            # a canary slower than a lease is as dead as a batch that slow
            async with asyncio.timeout(self.settings.lease_ms / 1000):
                await asyncio.get_running_loop().run_in_executor(self._executor, served.model.canary)
        except Exception as exc:
            if not served.canary_failing:
                log.error(
                    "canary of model %s version %d failed (%s): reporting it not ready until a canary passes",
                    info.name,
                    info.version,
                    str(exc) or type(exc).__name__,
                    exc_info=not isinstance(exc, SanityCheckFailed | TimeoutError),
                    extra={"model": info.name, "version": info.version},
                )
            served.canary_failing = True
            self._set_ready(served, False)
            return
        if not served.model.ready:
            log.warning(
                "canary of model %s version %d passed: reporting it ready again",
                info.name,
                info.version,
                extra={"model": info.name, "version": info.version},
            )
            # only on the way back: a pass between failing batches must not hide them
            served.consecutive_failures = 0
        served.canary_failing = False
        self._set_ready(served, True)

    def _set_ready(self, served: _Served, ready: bool) -> None:
        """Put a model in or out of service: its health entry and the router follow."""
        if served.model.ready == ready:
            return
        served.model.ready = ready
        self.on_readiness_change()
        self._track(asyncio.create_task(self._report_quietly()))

    async def reap_forever(self) -> None:
        """Sweep expired leases back onto their queues, every half lease.

        Every worker runs this; REAP is atomic and idempotent, so sweeps by many
        workers at once are safe, and any one live worker is enough.
        """
        interval_s = self.settings.lease_ms / 2000
        while not self._stopping.is_set():
            for served in list(self.served.values()):
                try:
                    await self._reap(served)
                except RedisError as exc:
                    log.warning("reaper: redis error for %s: %s", served.keys.ready, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval_s)

    async def _reap(self, served: _Served) -> None:
        reaped = await self.queue.reap(served.keys, max_attempts=self.settings.max_attempts)
        if reaped.requeued:
            served.stats.redelivered += reaped.requeued
            log.warning("redelivering %d requests of %s from expired leases", reaped.requeued, served.keys.ready)
        if not reaped.dead:
            return
        served.stats.failed += len(reaped.dead)
        blobs: dict[str, list[bytes]] = defaultdict(list)
        for job_id, reply_to, attempts in reaped.dead:
            message = f"model '{served.model.info.name}' crashed on this input {attempts} times"
            reply = mpb.InferReply(id=job_id, code=grpc.StatusCode.INTERNAL.value[0], message=message)
            blobs[reply_to].append(reply.SerializeToString())
        self._track(asyncio.create_task(self._write_replies(served, blobs, {})))

    async def _heartbeat(self, served: _Served, jobs: list[_Job]) -> None:
        """Extend the leases of a computing batch every third of a lease, until cancelled."""
        while True:
            await asyncio.sleep(self.settings.lease_ms / 3000)
            for token, ids in _by_token(jobs).items():
                with contextlib.suppress(RedisError):
                    await self.queue.extend(served.keys, token, ids, self.settings.lease_ms)

    # ------------------------------------------------------------ serve loop

    async def serve(self) -> None:
        """Block for work on every served model's wake list, take it, run it.

        The wait's key list is rebuilt before each wait, so models added or dropped
        are followed without a restart; a change pushes a token to the worker's own
        wake list, which ends a wait in progress (``_wake_serve_loop``).
        """
        if not self._by_wake:
            log.warning("worker %s holds no model; idle until the router assigns one", self.worker_id)
        # First look at every queue: work may be waiting whose wake token another
        # worker consumed (e.g. one that was stopped while blocked).
        targets = list(self._by_wake.values())
        backoff_s = 0.1
        while not self._stopping.is_set():
            await self._take_from(targets)
            if self._stopping.is_set():
                break
            if self._rescan:  # models were added while we worked: look at their queues first
                self._rescan = False
                targets = list(self._by_wake.values())
                continue
            wake_keys = [*self._by_wake, self._wake_self]
            self._blocked = asyncio.ensure_future(self.blocking.blpop(wake_keys, timeout=WAKE_SAFETY_TIMEOUT_S))
            self.idle.set()
            try:
                popped = await self._blocked
                backoff_s = 0.1
            except asyncio.CancelledError:
                if self._stopping.is_set():
                    break
                raise
            except RedisError as exc:
                log.warning("redis unavailable while waiting for work (%s); retrying in %.1fs", exc, backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
                popped = None
            finally:
                self._blocked = None
                self.idle.clear()
            targets = await self._woken(popped)

    async def _take_from(self, targets: list[_Served]) -> None:
        for served in targets:
            if not self._claims(served):  # dropped since it was woken
                continue
            served.idle.clear()
            try:
                await self._take_and_run(served)
            except RedisError as exc:
                # Jobs it had claimed stay leased; the reaper redelivers them.
                log.warning("redis error while taking work for %s: %s", served.keys.ready, exc)
            finally:
                served.idle.set()

    async def _woken(self, popped: Any) -> list[_Served]:
        """The models to look at after a wait: the one woken, or every one."""
        key = popped[0].decode() if popped else None
        if key is None or key == self._wake_self:
            self._rescan = False
            return list(self._by_wake.values())
        if (served := self._by_wake.get(key)) is not None:
            return [served]
        # A token of a model dropped while we waited: give it back to its other workers.
        try:
            await self.queue.rewake(self._known_keys[key])
        except RedisError as exc:
            log.warning(
                "could not give back the wake token of %s (%s); its workers look within %.0f s",
                key,
                exc,
                WAKE_SAFETY_TIMEOUT_S,
            )
        return []

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
            await self.redis.rpush(self._wake_self, 1)
        except RedisError as exc:
            log.warning("could not wake the serve loop (%s); it looks again within %.0f s", exc, WAKE_SAFETY_TIMEOUT_S)

    async def _take_and_run(self, served: _Served) -> None:
        info = served.model.info
        max_items = info.max_batch_size or 1
        share = self.settings.lower_tier_share
        claim = await self.queue.claim(
            served.keys,
            max_items=max_items,
            lease_ms=self.settings.lease_ms,
            worker_id=self.worker_id,
            lower_share_every=round(1 / share) if share > 0 else 0,
            batch_ms=served.batch_ms(),
        )
        self._answer_expired(served, claim)
        jobs = self._decode(claim)
        if not jobs:
            return
        if len(jobs) > 1 and sum(j.batch_size for j in jobs) < max_items and info.max_queue_delay_us > 0:
            await self._fill(served, jobs, max_items)
        if self._stopping.is_set():
            await self._release(served, jobs)
            return
        await self._run(served, jobs)

    async def _release(self, served: _Served, jobs: list[_Job]) -> None:
        """Stopping: give back jobs taken but not started, at once (not after the lease)."""
        for token, ids in _by_token(jobs).items():
            await self.queue.release(served.keys, token, ids)
        log.info("released %d requests of %s on shutdown", len(jobs), served.keys.ready)

    async def _fill(self, served: _Served, jobs: list[_Job], max_items: int) -> None:
        """Top a partial batch up with same-shaped jobs until the oldest has waited the max queue delay."""
        oldest_ms = min(job.request.enqueued_ms for job in jobs)
        fill_until_s = (oldest_ms + served.model.info.max_queue_delay_us / 1000) / 1000
        signature = _signature(jobs[0].request)
        while (room := max_items - sum(j.batch_size for j in jobs)) > 0:
            remaining_s = fill_until_s - time.time()
            if remaining_s <= 0:
                return
            await self.blocking.blpop([served.keys.wake], timeout=max(remaining_s, 0.001))
            claim = await self.queue.claim(
                served.keys,
                max_items=room,
                lease_ms=self.settings.lease_ms,
                worker_id=self.worker_id,
                signature=signature,
                batch_ms=served.batch_ms(),
            )
            self._answer_expired(served, claim)
            more = self._decode(claim)
            if more:
                jobs.extend(more)
                continue
            # Woken with nothing of this shape: another shape's jobs keep the wake
            # token coming back, so blocking again would spin. Wait out the window
            # once, then take what arrived.
            await asyncio.sleep(max(0.0, fill_until_s - time.time()))
            room = max_items - sum(j.batch_size for j in jobs)
            last = await self.queue.claim(
                served.keys,
                max_items=room,
                lease_ms=self.settings.lease_ms,
                worker_id=self.worker_id,
                signature=signature,
                batch_ms=served.batch_ms(),
            )
            self._answer_expired(served, last)
            jobs.extend(self._decode(last))
            return

    def _decode(self, claim: ClaimedBatch) -> list[_Job]:
        jobs = []
        for job_id, payload in claim.jobs:
            request = mpb.QueuedRequest.FromString(payload)
            batch = request.inputs[0].shape[0] if request.inputs and request.inputs[0].shape else 1
            jobs.append(_Job(job_id, claim.token, request, batch))
        return jobs

    async def _run(self, served: _Served, jobs: list[_Job]) -> None:
        claimed_ns = time.time_ns()
        now_ms = claimed_ns // 1_000_000
        live = [job for job in jobs if job.request.deadline_ms > now_ms]
        replies: list[tuple[_Job, mpb.InferReply]] = [
            (job, _error_reply(job, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded while queued"))
            for job in jobs
            if job.request.deadline_ms <= now_ms
        ]
        served.stats.expired += len(jobs) - len(live)
        if live:
            replies.extend(await self._compute(served, live, claimed_ns))
        self._spawn_reply(served, replies)

    async def _compute(self, served: _Served, jobs: list[_Job], claimed_ns: int) -> list[tuple[_Job, mpb.InferReply]]:
        info = served.model.info
        links, tenants = self._request_spans(info.name, jobs)
        total = sum(job.batch_size for job in jobs)
        attributes: dict[str, AttributeValue] = {
            "meshserve.model": info.name,
            "meshserve.version": info.version,
            "meshserve.batch_size": total,
            "meshserve.requests": len(jobs),
            "meshserve.device": self.settings.device,
            "meshserve.worker": self.worker_id,
        }
        if tenants:
            attributes["meshserve.tenants"] = tenants
        # a root of its own, sampled iff a request it links was (telemetry.downstream_sampler)
        root = otel_context.Context()
        with self.tracer.start_as_current_span("batch", links=links, attributes=attributes, context=root):
            feed = _stack(jobs)
            started_ns = time.time_ns()
            try:
                heartbeat = asyncio.create_task(self._heartbeat(served, jobs))
                try:
                    with self.tracer.start_as_current_span("compute"):
                        outputs = await asyncio.get_running_loop().run_in_executor(
                            self._executor, served.model.run, feed
                        )
                finally:
                    heartbeat.cancel()
            except Exception as exc:  # a model failure answers its requests, never kills the worker
                log.exception("model %s failed on a batch of %d", info.name, total)
                served.stats.failed += len(jobs)
                self._count_failure(served)
                message = f"model '{info.name}' failed: {exc}"
                return [(job, _error_reply(job, grpc.StatusCode.INTERNAL, message)) for job in jobs]
            compute_us = (time.time_ns() - started_ns) // 1000
            served.consecutive_failures = 0
            if log.isEnabledFor(logging.INFO):  # inside the batch span: the line carries its trace id
                _log_batch(info, jobs, total, compute_us, claimed_ns)
        version = str(info.version)
        compute_s = compute_us / 1e6
        served.observe_compute(compute_us / 1000)
        self.metrics.batch_size.labels(info.name, version).observe(total)
        self.metrics.compute.labels(info.name, version).observe(compute_s)
        queue_wait = self.metrics.queue_wait.labels(info.name, version)
        stats = served.stats
        for job in jobs:
            wait_s = max(0.0, claimed_ns / 1e9 - job.request.enqueued_ms / 1000)
            queue_wait.observe(wait_s)
            stats.queue_wait_seconds += wait_s
            # the batch's device time, shared by items: what each tenant costs
            self.tenant_device_seconds[(job.request.tenant, info.name)] += compute_s * job.batch_size / total
        stats.batches += 1
        stats.items += total
        stats.requests += len(jobs)
        stats.largest_batch = max(stats.largest_batch, total)
        stats.device_seconds += compute_s
        return _split(served, jobs, outputs, compute_us, claimed_ns, self.worker_id)

    def _request_spans(self, model: str, jobs: list[_Job]) -> tuple[list[trace.Link], list[str]]:
        """A queue_wait span per request, in the request's own trace (its sampled flag
        decides); returns the batch span's links and its distinct tenants as spans name them."""
        links = []
        tenants: set[str] = set()
        for job in jobs:
            ctx = extract(job.request.trace_context)
            parent = trace.get_current_span(ctx).get_span_context()
            if parent.is_valid:
                links.append(trace.Link(parent))
            with self.tracer.start_as_current_span(
                "queue_wait", context=ctx, start_time=job.request.enqueued_ms * 1_000_000
            ) as span:
                span.set_attribute("meshserve.model", model)
                if (traced := self._tenant_on_span(job.request.tenant)) is not None:
                    span.set_attribute("meshserve.tenant", traced)
                    tenants.add(traced)
            # the span ends here, at claim time (roughly): its length is the queue wait
        return links, sorted(tenants)

    def _count_failure(self, served: _Served) -> None:
        """A model failing batch after batch is taken out of service (not ready)."""
        served.consecutive_failures += 1
        if served.consecutive_failures == FAILURES_BEFORE_NOT_READY and served.model.ready:
            info = served.model.info
            log.error(
                "model %s version %d failed %d batches in a row: reporting it not ready until a canary passes",
                info.name,
                info.version,
                served.consecutive_failures,
                extra={"model": info.name, "version": info.version},
            )
            self._set_ready(served, False)

    async def _report_quietly(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self.report()

    def _answer_expired(self, served: _Served, claim: ClaimedBatch) -> None:
        """Jobs the claim script found past their deadline: answer them, never compute them."""
        if not claim.expired:
            return
        served.stats.expired += len(claim.expired)
        blobs: dict[str, list[bytes]] = defaultdict(list)
        for job_id, reply_to in claim.expired:
            reply = mpb.InferReply(
                id=job_id, code=grpc.StatusCode.DEADLINE_EXCEEDED.value[0], message="deadline exceeded while queued"
            )
            blobs[reply_to].append(reply.SerializeToString())
        task = asyncio.create_task(self._write_replies(served, blobs, {}))
        self._track(task)

    def _spawn_reply(self, served: _Served, replies: list[tuple[_Job, mpb.InferReply]]) -> None:
        blobs: dict[str, list[bytes]] = defaultdict(list)
        for job, reply in replies:
            blobs[job.request.reply_to].append(reply.SerializeToString())
        acks = _by_token([job for job, _ in replies])
        self._track(asyncio.create_task(self._write_replies(served, blobs, acks)))

    def _track(self, task: asyncio.Task[None]) -> None:
        self._reply_tasks.add(task)
        task.add_done_callback(self._reply_tasks.discard)

    async def _write_replies(self, served: _Served, blobs: dict[str, list[bytes]], acks: dict[int, list[str]]) -> None:
        """Write replies, then ack, in one pipelined round trip (replies first: an
        ack never precedes its reply). Shielded from cancellation by ``close``."""
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for reply_to, items in blobs.items():
                    pipe.rpush(reply_to, *items)
                    pipe.expire(reply_to, REPLY_TTL_S)
                for token, ids in acks.items():
                    self.queue.ack_in(pipe, served.keys, token, ids)
                results = await pipe.execute(raise_on_error=False)
            if any(isinstance(result, NoScriptError) for result in results):
                for token, ids in acks.items():  # Redis lost its scripts: ack again, loading it
                    await self.queue.ack(served.keys, token, ids)
            elif failed := next((r for r in results if isinstance(r, RedisError)), None):
                raise failed
        except RedisError:
            # The lease stays in Redis; the reaper redelivers (TODO(#4)).
            log.exception("could not write %d replies for %s", sum(map(len, blobs.values())), served.keys.ready)


def _log_batch(info: ModelInfo, jobs: list[_Job], total: int, compute_us: int, claimed_ns: int) -> None:
    """The per-batch INFO line; its fields ride as ``extra`` for the JSON log format."""
    oldest_wait_ms = max(0.0, claimed_ns / 1e6 - min(job.request.enqueued_ms for job in jobs))
    log.info(
        "batch of %d from %d requests for %s version %d: compute %.1f ms, oldest waited %.1f ms",
        total,
        len(jobs),
        info.name,
        info.version,
        compute_us / 1000,
        oldest_wait_ms,
        extra={
            "model": info.name,
            "version": info.version,
            "batch_size": total,
            "requests": len(jobs),
            "compute_ms": round(compute_us / 1000, 3),
            "queue_wait_ms": round(oldest_wait_ms, 3),
        },
    )


def _set(event: asyncio.Event) -> asyncio.Event:
    event.set()
    return event


def _by_token(jobs: list[_Job]) -> dict[int, list[str]]:
    """Job ids grouped by the lease (fencing token) they were claimed under."""
    groups: dict[int, list[str]] = defaultdict(list)
    for job in jobs:
        groups[job.token].append(job.job_id)
    return groups


def _signature(request: mpb.QueuedRequest) -> str:
    return ";".join(",".join(str(d) for d in t.shape[1:]) for t in request.inputs)


def _stack(jobs: list[_Job]) -> dict[str, np.ndarray[Any, Any]]:
    """One feed for the batch: inputs concatenated along dim 0 (a view for one job)."""
    if len(jobs) == 1:
        return {t.name: to_array(t) for t in jobs[0].request.inputs}
    names = [t.name for t in jobs[0].request.inputs]
    return {name: np.concatenate([to_array(job.request.inputs[i]) for job in jobs]) for i, name in enumerate(names)}


def _split(
    served: _Served,
    jobs: list[_Job],
    outputs: list[np.ndarray[Any, Any]],
    compute_us: int,
    claimed_ns: int,
    worker_id: str,
) -> list[tuple[_Job, mpb.InferReply]]:
    """Cut batch outputs back into one reply per request (views, one copy into bytes)."""
    info = served.model.info
    specs = info.outputs
    replies = []
    start = 0
    for job in jobs:
        end = start + job.batch_size
        wanted = set(job.request.outputs)
        reply = mpb.InferReply(
            id=job.job_id,
            model=info.name,
            version=info.version,
            compute_us=compute_us,
            queue_wait_us=max(0, claimed_ns // 1000 - job.request.enqueued_ms * 1000),
            worker_id=worker_id,
        )
        for spec, out in zip(specs, outputs, strict=True):
            if wanted and spec.name not in wanted:
                continue
            part = out[start:end] if info.max_batch_size else out
            reply.outputs.append(from_array(spec.name, spec.datatype, part))
        replies.append((job, reply))
        start = end
    return replies


def _error_reply(job: _Job, code: grpc.StatusCode, message: str) -> mpb.InferReply:
    return mpb.InferReply(id=job.job_id, code=code.value[0], message=message)
