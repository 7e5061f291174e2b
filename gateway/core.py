"""The gateway's plain core: resolve, validate, enqueue, await the reply.

One reply reader per gateway process drains the gateway's reply list and
completes the waiting call's future; each waiter removes its own entry. Every
wait is bounded by the request's deadline, and shorter when Redis comes back
without a waiting call's job: after each reconnect the reader looks for the jobs
it still waits on and answers those Redis no longer holds UNAVAILABLE (safe to
retry) instead of letting them wait out their deadline. The routing table
(which models exist, their metadata, whether they are ready) comes from a
:class:`gateway.routing.RoutingWatch` the core is given; requests come as
:class:`gateway.request.InferCall` values, their parameters already read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any

from opentelemetry import trace
from redis.exceptions import RedisError

from gateway.decoupled import worker_parameters
from gateway.demand import Demands
from gateway.job_ids import new_job_id
from gateway.partitions import PartitionChooser, share
from gateway.request import InferCall
from gateway.routing import RoutingWatch
from gateway.sequences import Sequences, step_of
from gateway.shadow import ShadowCounts, shadow_and_compare
from gateway.versions import VersionChooser
from meshserve.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from meshserve.models.repository import ModelInfo
from meshserve.observe.tracing import UNTRACED, inject, records
from meshserve.queue import (
    DEFAULT_TIER,
    NUM_TIERS,
    Enqueued,
    ModelKeys,
    QueueProtocol,
    abandon,
    pop_replies,
    pop_replies_now,
    reply_key,
)
from meshserve.settings import GatewaySettings
from meshserve.store.link import RedisLink
from meshserve.store.memory import EvictionPolicyError, MemoryWatch
from meshserve.store.refusals import RefusalLog, store_refusal_message
from meshserve.tenancy.admission import Admission
from meshserve.tenancy.tenants import Tenant, TenantRegistry, dev_registry
from meshserve.tenancy.throttle import RateRefusals
from meshserve.wire.codec import PackedInputs, check_requested_outputs, declared_bytes, pack_inputs, requested_classes
from meshserve.wire.envelope import OFF_LOOP_BYTES, ReplyAs, Unframed, failed_reply, frame, reply_error, unframe
from protos import meshserve_pb2 as mpb

log = logging.getLogger(__name__)

REPLY_BATCH = 512
"""Replies drained per blocking read."""

REPLY_WAIT_S = 1.0
"""A blocking read for replies ends after this long with none, so that a reconnect
(which the link's retry can hide inside the read) is looked at within it."""

STRANDED_AFTER_S = 1.0
"""Redis over its maxmemory this long (no worker can claim): queued calls are answered."""

STRANDED_MESSAGE = (
    "queue store out of memory: Redis is over its maxmemory, so no worker could take this request; retry later"
)

LOST_MESSAGE = "Redis lost this request (it restarted without it); it may not have run: retry it"
"""What a caller hears when its job is gone from Redis and no reply came."""


async def _handing_to(shadow: asyncio.Future[Unframed], waiting: Awaitable[Unframed]) -> Unframed:
    """The caller's answer, handed on to its shadow copy for comparison (cancelled:
    the caller got none)."""
    try:
        answer = await waiting
    except BaseException:
        shadow.cancel()
        raise
    if not shadow.done():
        shadow.set_result(answer)
    return answer


def tier_of(asked: int | None, tenant: Tenant, *, open_registry: bool) -> int:
    """The queue tier of a request that asks for tier ``asked`` (None: asks none).

    A tenant's tier is both its default and its ceiling: ``priority`` can lower a
    request within it, never raise it. The open development tenant has no
    ceiling, and its requests default to the standard tier, as in Triton.
    """
    if open_registry:
        return DEFAULT_TIER if asked is None else asked
    return tenant.tier if asked is None else max(tenant.tier, asked)


class Gateway:
    """Owns the reply reader; ``infer`` is the hot path. Reads the routing table off
    ``routing``, whose watch its owner starts and stops."""

    def __init__(
        self,
        settings: GatewaySettings,
        redis: RedisLink,
        blocking_redis: RedisLink,
        routing: RoutingWatch,
        tracer: trace.Tracer | None = None,
        tenants: TenantRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.gateway_id = settings.gateway_id
        self.tenants = tenants or dev_registry()
        self.admission = Admission(redis)
        self.redis = redis
        self.blocking = blocking_redis
        self.queue = QueueProtocol(redis)
        self.routing = routing
        self.versions_chooser = VersionChooser(lambda: self.routing.view)
        self.shadow_counts = ShadowCounts()
        self.sequences = Sequences(redis)  # stateful models' steps: admitted before they are queued
        self._shadows: set[asyncio.Task[None]] = set()  # shadow copies in flight: cancelled at stop
        self.demands = Demands(routing.router, self.gateway_id)  # models not resident: loaded on request
        self.tracer = tracer or trace.NoOpTracer()
        self.tracing = records(self.tracer)
        self.reply_to = reply_key(self.gateway_id)
        self.pending: dict[str, asyncio.Future[Unframed]] = {}
        self.partials: dict[str, Callable[[Unframed], None]] = {}  # job id -> a decoupled call's partial replies
        self.queued: dict[str, tuple[ModelKeys, int]] = {}  # job id -> (its keys, deadline ms): enqueued, unanswered
        self.partitions = PartitionChooser()  # a partitioned model's queue partition per request
        self.late_replies = 0
        self.lost_jobs = 0  # waiting calls answered UNAVAILABLE: Redis no longer held their job
        self.looked_for_lost = asyncio.Event()  # set after each look for lost jobs (a reconnect)
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self.throttle = RateRefusals()  # tenants over their rate until their retry-after (read by gateway.refusal)
        self.refusals = RefusalLog(log, "requests")  # Redis refusing enqueues, by kind, once per interval
        self.store = MemoryWatch(
            redis,
            interval_ms=settings.store_sample_ms,
            headroom_ratio=settings.store_headroom_ratio,
            on_tick=self._after_memory_reading,
        )
        self._over_since_s: float | None = None  # monotonic s: Redis over its maxmemory since then
        self.stranded_jobs = 0  # queued calls answered because Redis stayed over its maxmemory

    async def start(self) -> None:
        """Check Redis (its eviction policy: a refusal raises ``EvictionPolicyError``;
        an unreachable Redis is only logged, the links reconnect), then start the
        reply reader and the memory watch."""
        try:
            await self.redis.execute("PING")
        except EvictionPolicyError:
            raise
        except RedisError as exc:
            log.warning("redis unavailable at start (%s): requests are refused until it is back", exc)
        self._tasks = [asyncio.create_task(self._read_replies(), name="reply-reader")]
        self.store.start()

    async def stop(self) -> None:
        await self.demands.close()
        await self.settle()
        for task in self._shadows:
            task.cancel()
        await asyncio.gather(*self._shadows, return_exceptions=True)
        await self.store.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def settle(self) -> None:
        """Until the background work begun so far (admission slot releases, withdrawals
        of abandoned jobs) is done; its failures are logged where they happen."""
        await asyncio.gather(*self._background, return_exceptions=True)

    # ------------------------------------------------------------ readiness

    def server_ready(self) -> bool:
        """Every model that could load serves (every model, with ``strict_readiness``).
        With ``scale_from_zero``, once a routing table names models: workers may all
        be scaled to zero, and an unready gateway would get no call to wake them."""
        if self.settings.scale_from_zero:
            return bool(self.routing.view.models)
        return self.routing.server_ready(strict=self.settings.strict_readiness)

    def knows_model(self, name: str) -> bool:
        """Whether the routing table has a model of this name (any version)."""
        return name in self.routing.view.latest

    def versions(self, name: str) -> list[int]:
        """The versions of model ``name`` in the routing table, in ascending order."""
        return sorted(v for (model, v) in self.routing.view.models if model == name)

    def resolve(self, name: str, version: str, call: InferCall | None = None) -> ModelInfo:
        """The model a request names; raises NotFound for an unknown model or version.
        No version: the one the model's split picks for ``call``, else the latest ready
        (gateway/versions.py)."""
        view = self.routing.view
        if not version:
            chosen = self.versions_chooser.choose(name, call)
            if chosen is None:
                raise NotFound(f"unknown model '{name}'")
            return view.models[(name, chosen)]
        try:
            model = view.models.get((name, int(version)))
        except ValueError:
            raise NotFound(f"unknown version '{version}' of model '{name}'") from None
        if model is None:
            if name not in view.latest:
                raise NotFound(f"unknown model '{name}'")
            raise NotFound(f"unknown version '{version}' of model '{name}'")
        return model

    def decoupled(self, name: str, version: int) -> bool:
        """Whether model ``name`` version ``version`` is decoupled (answers many times)."""
        model = self.routing.view.models.get((name, version))
        return model is not None and model.decoupled

    def model_ready(self, model: ModelInfo) -> bool:
        return (model.name, model.version) in self.routing.view.ready

    # ------------------------------------------------------------ hot path

    def authorize(self, tenant: Tenant, model_name: str) -> None:
        """PERMISSION_DENIED for a model outside the tenant's patterns, whether or
        not it exists: the answer must not reveal the models of other tenants."""
        if not tenant.may_use(model_name):
            raise PermissionDenied(f"model '{model_name}' is not available to tenant '{tenant.name}'")

    async def infer(
        self,
        call: InferCall,
        *,
        deadline_ms: float,
        tenant: Tenant,
        on_partial: Callable[[Unframed], None] | None = None,
        reply_as: ReplyAs | None = None,
    ) -> Unframed:
        """Authorize, validate, admit, enqueue and await one request; raises a
        MeshError on failure. The answer is the worker's reply (an ``InferReply``)
        and its outputs' bytes. A decoupled model's replies before the last go to
        ``on_partial`` (gateway/decoupled.py), in order; without it (ModelInfer),
        a decoupled model is refused INVALID_ARGUMENT. ``reply_as``: the reply asked
        for laid out as the response (meshserve/wire/envelope.py); a worker that
        does not know layouts answers framed all the same.

        ``deadline_ms`` is absolute (epoch ms), already the earlier of the gRPC
        deadline and the gateway's default; the call's ``timeout_ms`` may
        shorten it further. The tenant comes from the verified credential.
        """
        self.authorize(tenant, call.model_name)
        model = self.resolve(call.model_name, call.model_version, call)
        step = step_of(call.message, model)  # None: a stateless model's request (the common case)
        if model.decoupled and on_partial is None:
            raise InvalidArgument(
                f"model '{model.name}' is decoupled (it may answer a request many times):"
                " call it with ModelStreamInfer, not ModelInfer"
            )
        cold = not self.model_ready(model)
        if cold and (model.name, model.version) not in self.routing.view.evicted and not self.settings.scale_from_zero:
            failed = self.routing.view.failed.get((model.name, model.version))
            why = f": it failed to load ({failed})" if failed else ""
            if (model.name, model.version) in self.routing.view.unloading:
                why = ": it is UNLOADING (RepositoryModelUnload)"
            raise Unavailable(f"model '{model.name}' version {model.version} is not ready{why}")
        if self.store.full:
            raise self._store_full()
        now_ms = time.time() * 1000
        timeout_ms = call.timeout_ms
        if timeout_ms is not None:
            deadline_ms = min(deadline_ms, now_ms + timeout_ms)
        if deadline_ms <= now_ms:
            raise DeadlineExceeded("deadline exceeded before the request was queued")
        started_ms = now_ms
        if cold:  # evicted: loads on demand, and the request waits in the queue meanwhile
            await self.demands.admit((model.name, model.version), deadline_ms)
            now_ms = time.time() * 1000

        # Admission before decoding tensors: a flood of refused calls must cost the
        # gateway as little as possible, or it slows every other tenant's calls.
        limited = tenant.rate_per_s > 0 or tenant.max_inflight > 0
        job_id = await self._admit(tenant, int(deadline_ms)) if limited else new_job_id()
        try:
            if declared_bytes(call.message) > OFF_LOOP_BYTES:
                packed = await asyncio.to_thread(pack_inputs, call.message, model, call.raw)
            else:
                packed = pack_inputs(call.message, model, call.raw)
            outputs = check_requested_outputs(call.message, model)
            queued_step = None
            tier = tier_of(call.tier, tenant, open_registry=self.tenants.open)
            if step is not None:  # one more round trip, for stateful models only (gateway/sequences.py)
                member, tier = await self.sequences.admit(model, tenant.name, step, packed.batch_size, tier)
                queued_step = (member, step.flags)
            partial = on_partial if model.decoupled else None
            waiting = self._queue_and_wait(
                call,
                model,
                packed,
                outputs,
                tenant,
                job_id,
                deadline_ms,
                now_ms,
                tier,
                step=queued_step,
                on_partial=partial,
                reply_as=reply_as,
            )
            shadow = (
                None
                if call.model_version or step is not None or partial
                else self._shadow(call, model, packed, outputs, tenant, deadline_ms)
            )
            del packed  # the wait lets go of the request's bytes once they are queued
            answer = await waiting if shadow is None else await _handing_to(shadow, waiting)
            if cold:
                self.demands.on_wait(model.name, time.time() - started_ms / 1000)
            return answer
        finally:
            if limited:
                self._release(tenant, job_id)

    def _shadow(
        self,
        call: InferCall,
        model: ModelInfo,
        packed: PackedInputs,
        outputs: list[str],
        tenant: Tenant,
        deadline_ms: float,
    ) -> asyncio.Future[Unframed] | None:
        """When the model's split copies this request to a shadow version: start the
        copy (gateway/shadow.py) and return the future the caller's answer goes to."""
        version = self.versions_chooser.shadow(model.name, model.version)
        candidate = self.routing.view.models.get((model.name, version)) if version else None
        if candidate is None:
            return None
        primary: asyncio.Future[Unframed] = asyncio.get_running_loop().create_future()
        copy = replace(call, tier=NUM_TIERS - 1, request_id="")  # the lowest tier: behind every caller
        tier = tier_of(copy.tier, tenant, open_registry=self.tenants.open)
        waiting = self._queue_and_wait(
            copy, candidate, packed, outputs, tenant, new_job_id(), deadline_ms, time.time() * 1000, tier
        )
        task = asyncio.create_task(shadow_and_compare(waiting, primary, model.name, version, self.shadow_counts))
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)
        return primary

    def _store_full(self) -> ResourceExhausted:
        """The refusal of a request while Redis is within its headroom of ``maxmemory``:
        refused whole, before any write, rather than failing half-way through."""
        memory = self.store.latest
        assert memory is not None
        return ResourceExhausted(
            f"queue store full: Redis uses {memory.used_bytes} of its {memory.maxmemory_bytes} bytes of maxmemory"
            f" (new requests are refused with less than {self.store.headroom_ratio:.0%} left); retry later",
            reason="store_full",
            retry_after_ms=max(1, self.settings.store_sample_ms),
        )

    async def _admit(self, tenant: Tenant, deadline_ms: int) -> str:
        """Admit a new job of ``tenant``; its id. One Redis script, unless this
        gateway already knows the tenant is over its rate: GCRA admits nothing
        before its retry hint, so until then the answer is the same without the
        round trip (or a job id)."""
        self.throttle.check(tenant)
        job_id = new_job_id()
        try:
            decision = await self.admission.admit(tenant, job_id, deadline_ms=deadline_ms)
        except RedisError as exc:
            if self.refusals.note(exc):
                raise Unavailable(store_refusal_message(exc, "the request's admission")) from exc
            raise Unavailable(f"admission unavailable: {exc}") from exc
        if not decision.ok:
            if decision.reason == "rate":
                self.throttle.remember(tenant, decision.retry_after_ms)
            raise ResourceExhausted(
                decision.describe(tenant), reason=decision.reason, retry_after_ms=decision.retry_after_ms
            )
        return job_id

    def _release(self, tenant: Tenant, job_id: str) -> None:
        """In the background (shielded from the caller's cancellation): free the slot."""
        task = asyncio.create_task(self._release_slot(tenant, job_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _release_slot(self, tenant: Tenant, job_id: str) -> None:
        try:
            await self.admission.release(tenant, job_id)
        except RedisError as exc:  # the entry expires with the request's deadline
            log.debug("could not release %s for %s: %s", job_id, tenant.name, exc)

    async def _queue_and_wait(
        self,
        call: InferCall,
        model: ModelInfo,
        packed: PackedInputs,
        outputs: list[str],
        tenant: Tenant,
        job_id: str,
        deadline_ms: float,
        now_ms: float,
        tier: int,
        *,
        step: tuple[str, str] | None = None,
        on_partial: Callable[[Unframed], None] | None = None,
        reply_as: ReplyAs | None = None,
    ) -> Unframed:
        envelope = mpb.QueuedRequest(
            id=job_id,
            model=model.name,
            version=model.version,
            tenant=tenant.name,
            deadline_ms=int(deadline_ms),
            reply_to=self.reply_to,
            client_request_id=call.request_id,
            inputs=packed.tensors,
            outputs=outputs,
            enqueued_ms=int(now_ms),
            priority=tier,
            items=packed.batch_size,
            shape_signature=packed.signature,
        )
        if reply_as is not None:
            envelope.reply_layout, envelope.response_head = reply_as.layout, reply_as.head  # type: ignore[assignment]
        if call.message.outputs:  # Triton's classification extension: the worker ranks them
            envelope.class_counts.update(requested_classes(call.message, model))
        if on_partial is not None:
            envelope.parameters.update(worker_parameters(call.message))
            self.partials[job_id] = on_partial
        # a stateful model's step: partition 0, where its sequence lives (such a model has one)
        candidates = self.partitions.order(model) if step is None else (ModelKeys.for_model(model.name, model.version),)
        keys = candidates[0]
        future: asyncio.Future[Unframed] = asyncio.get_running_loop().create_future()
        self.pending[job_id] = future
        partitioned = len(candidates) > 1
        counted = False
        try:
            async with asyncio.timeout((deadline_ms - now_ms) / 1000):
                keys = await self._enqueue(candidates, model, envelope, packed, tenant, step)
                del packed  # written to Redis: not held while the reply is awaited
                if call.raw is not None:
                    call.raw.clear()  # nor are the received bytes they were views of
                self.queued[job_id] = (keys, envelope.deadline_ms)
                if partitioned:
                    self.partitions.queued(keys)
                    counted = True
                answer = await future
        except TimeoutError:
            # No withdraw: the job's deadline has passed too, so no worker will run it.
            raise DeadlineExceeded(f"deadline exceeded waiting for model '{model.name}'") from None
        except asyncio.CancelledError:  # the client went away, or the gateway is out of grace
            self._withdraw(keys, job_id, generating=on_partial is not None)
            raise
        finally:
            self.pending.pop(job_id, None)
            self.queued.pop(job_id, None)
            if counted:
                self.partitions.answered(keys)
            if on_partial is not None:
                self.partials.pop(job_id, None)
        reply = answer.message
        if self.tracing and reply.replied_unix_ns:  # set by the worker for a sampled request only
            self._reply_span(reply)
        check_reply(reply, envelope.class_counts)
        return answer

    def _reply_span(self, reply: mpb.InferReply) -> None:
        """The way back, in the call's trace: from the worker writing the reply (its
        clock, so clamped to now against skew) to the call resuming with it."""
        ended_ns = time.time_ns()
        span = self.tracer.start_span(
            "reply",
            start_time=min(reply.replied_unix_ns, ended_ns),
            attributes={
                "meshserve.model": reply.model,
                "meshserve.version": reply.version,
                "meshserve.worker": reply.worker_id,
            },
        )
        span.end(end_time=ended_ns)

    def _withdraw(self, keys: ModelKeys, job_id: str, *, generating: bool = False) -> None:
        """In the background: take an abandoned job off the queue unless a worker holds
        it; a decoupled one (``generating``) a worker holds is marked for it to end."""
        task = asyncio.create_task(self._withdraw_job(keys, job_id, generating))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _withdraw_job(self, keys: ModelKeys, job_id: str, generating: bool = False) -> None:
        try:
            if not await self.queue.withdraw(keys, job_id) and generating:
                await abandon(self.redis, keys, job_id)
        except RedisError as exc:  # harmless: the claim drops it once its deadline passes
            log.debug("could not withdraw %s: %s", job_id, exc)

    async def _enqueue(
        self,
        candidates: tuple[ModelKeys, ...],
        model: ModelInfo,
        envelope: mpb.QueuedRequest,
        packed: PackedInputs,
        tenant: Tenant,
        step: tuple[str, str] | None = None,
    ) -> ModelKeys:
        """Queue the request on the first of ``candidates`` (queue partitions, best
        first) that accepts it; the keys it went to. A refusal writes nothing, so the
        next partition is tried; the last one's refusal is raised."""
        partitions = len(candidates)
        with self.tracer.start_as_current_span("enqueue") if self.tracing else UNTRACED as span:
            if self.tracing:
                span.set_attribute("meshserve.model", model.name)
                span.set_attribute("meshserve.version", model.version)
                inject(envelope.trace_context)
            payload = frame(envelope, packed.data)
            payload_key = self.routing.view.payload_keys
            for keys in candidates:
                try:
                    result = await self.queue.enqueue(
                        keys,
                        envelope.id,
                        tier=envelope.priority,
                        payload=payload,
                        deadline_ms=envelope.deadline_ms,
                        tenant=envelope.tenant,
                        reply_to=envelope.reply_to,
                        signature=packed.signature,
                        max_queue_size=share(model.max_queue_size, partitions),
                        items=packed.batch_size,
                        weight=tenant.weight,
                        tenant_max_queued=share(tenant.max_queued, partitions),
                        step=step,
                        payload_key=payload_key,
                    )
                except RedisError as exc:
                    if self.refusals.note(exc):  # Redis is up but refuses writes: say what it said
                        raise Unavailable(store_refusal_message(exc, "the request")) from exc
                    raise Unavailable(f"request queue unavailable: {exc}") from exc
                if result.code in (Enqueued.ENQUEUED, Enqueued.DUPLICATE):
                    return keys
        self._refused(result, model, envelope, tenant)
        return keys  # a code no refusal names: taken as queued, as always

    def _refused(self, result: Enqueued, model: ModelInfo, envelope: mpb.QueuedRequest, tenant: Tenant) -> None:
        """Raise the refusal ``result`` says (every partition refused the request)."""
        if result.code == Enqueued.MODEL_QUEUE_FULL:
            raise ResourceExhausted(
                f"queue of model '{model.name}' is full ({model.max_queue_size} requests waiting)",
                reason="model_queue_full",
            )
        if result.code == Enqueued.TENANT_QUEUE_FULL:
            raise ResourceExhausted(
                f"tenant '{tenant.name}' has {tenant.max_queued} requests queued for model '{model.name}' already",
                reason="tenant_queue_full",
            )
        if result.code == Enqueued.PAST_DEADLINE:
            left_ms = max(0, int(envelope.deadline_ms - time.time() * 1000))
            raise ResourceExhausted(
                f"model '{model.name}' cannot answer within the deadline: about {result.wait_ms} ms of"
                f" requests are ahead of this one and {left_ms} ms are left",
                reason="deadline",
                retry_after_ms=max(1, result.wait_ms - left_ms),
            )

    # ------------------------------------------------------------ background tasks

    async def _after_memory_reading(self) -> None:
        """After each reading of Redis's memory: flush the refusal counts, and answer
        the queued calls once Redis has stayed over its maxmemory for
        ``STRANDED_AFTER_S``. Over it, every claim is refused (``OOM``), so a queued
        job waits until memory is freed, or for its whole deadline if nothing frees
        it; withdrawing needs no memory (it only deletes)."""
        self.refusals.flush()
        memory = self.store.latest
        if memory is None or not memory.over:
            self._over_since_s = None
            return
        now_s = time.monotonic()
        if self._over_since_s is None:
            self._over_since_s = now_s
        if now_s - self._over_since_s < STRANDED_AFTER_S or not self.queued:
            return
        waiting = list(self.queued.items())
        try:
            withdrawn = await asyncio.gather(*(self.queue.withdraw(keys, job_id) for job_id, (keys, _) in waiting))
        except RedisError as exc:
            log.debug("could not withdraw queued requests: %s", exc)
            return
        answered = 0
        for (job_id, _), taken in zip(waiting, withdrawn, strict=True):
            future = self.pending.get(job_id)
            if taken and future is not None and not future.done():
                future.set_result(Unframed(failed_reply(job_id, Unavailable(STRANDED_MESSAGE)), [], framed=False))
                answered += 1
        if answered:
            self.stranded_jobs += answered
            log.warning(
                "redis over its maxmemory for %.0f s: answered %d queued requests UNAVAILABLE",
                now_s - self._over_since_s,
                answered,
            )

    async def _read_replies(self) -> None:
        """The one reply reader: drain the reply list, complete waiting futures.

        After its connection to Redis was opened again, it first answers the calls
        whose jobs Redis lost (``_answer_lost``), then reads on.
        """
        backoff_s = 0.1
        looked_at = 1  # connections of the blocking link at the last look; the first is no reconnect
        while True:
            try:
                if (connections := self.blocking.connections) > looked_at:
                    await self._answer_lost()
                    looked_at = connections
                blobs = await pop_replies(self.blocking, self.reply_to, wait_s=REPLY_WAIT_S, max_count=REPLY_BATCH)
                backoff_s = 0.1
            except RedisError as exc:
                log.warning("reply reader: redis unavailable (%s); retrying in %.1fs", exc, backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
                continue
            if blobs:
                self._deliver(blobs)
                blobs.clear()  # not held while the next read waits: a large reply's buffer is the response

    def _deliver(self, blobs: list[Any]) -> None:
        for blob in blobs:  # bytes, a large one's buffer, or a laid-out one's head and response
            answer = unframe(blob, mpb.InferReply)  # views of the blob: no copy
            if answer.message.more:  # a decoupled call's response before its last
                if (partial := self.partials.get(answer.message.id)) is not None:
                    partial(answer)
                continue
            future = self.pending.get(answer.message.id)
            if future is None or future.done():
                self.late_replies += 1  # the caller gave up, or a duplicate
                log.debug(
                    "late reply for job %s (status %s): nobody waits for it", answer.message.id, answer.message.code
                )
                continue
            future.set_result(answer)

    async def _answer_lost(self) -> None:
        """Answer UNAVAILABLE every waiting call whose job Redis no longer holds.

        Redis that restarts without persistence, or with ``appendfsync everysec``
        while a slow fsync held back its last writes, or fails over to a replica
        that lagged, can come back without jobs it had accepted. Their callers
        would wait out their deadlines for nothing. A worker writes a job's reply
        before it deletes the job's hash, and this reader is the reply list's only
        consumer, so a job whose hash is gone either has its reply in the list now
        or was lost. Jobs already at their deadline are left to it: a claim drops
        those before their DEADLINE_EXCEEDED reply is written.
        """
        try:
            await self._answer_gone(list(self.queued.items()))
        finally:
            self.looked_for_lost.set()

    async def _answer_gone(self, waiting: list[tuple[str, tuple[ModelKeys, int]]]) -> None:
        if not waiting:
            return
        # raises e.g. while Redis still loads its data: looked at again after the backoff
        found = await self.queue.held([(keys, job_id) for job_id, (keys, _) in waiting])
        gone = [
            (job_id, deadline_ms)
            for (job_id, (_, deadline_ms)), exists in zip(waiting, found, strict=True)
            if not exists
        ]
        if not gone:
            return
        while blobs := await pop_replies_now(self.blocking, self.reply_to, max_count=REPLY_BATCH):
            self._deliver(blobs)
        soon_ms = time.time() * 1000 + 1000  # within a second of its deadline: a claim may have expired it
        lost = 0
        for job_id, deadline_ms in gone:
            future = self.pending.get(job_id)
            if future is not None and not future.done() and deadline_ms > soon_ms:
                future.set_result(Unframed(failed_reply(job_id, Unavailable(LOST_MESSAGE)), [], framed=False))
                lost += 1
        if lost:
            self.lost_jobs += lost
            log.warning(
                "redis no longer holds %d waiting requests (restarted without them): answered UNAVAILABLE", lost
            )


def check_reply(reply: mpb.InferReply, class_counts: Mapping[str, int]) -> None:
    """Raise the error a worker answered; and refuse the scores it answered where
    classes were asked for: a worker older than ``QueuedRequest.class_counts`` ignores
    the field (docs/reliability.md, rolling upgrades). Ranked classes are BYTES, and
    no output that may be ranked is. A laid-out reply comes from a newer worker."""
    if (error := reply_error(reply)) is not None:
        raise error
    if not class_counts or reply.layout:
        return
    for output in reply.outputs:
        if output.name in class_counts and output.datatype != "BYTES":
            raise Unavailable(
                f"output '{output.name}': the worker that ran this request does not rank classes"
                " (an older version); retry once the workers are upgraded"
            )
