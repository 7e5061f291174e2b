"""One batch of one model: claim it, fill it, run it, account for it, reply.

Batching policy: a lone request on an idle worker runs at once. When a claim
finds several requests but fewer than the max batch, the runner waits up to the
model's max queue delay, counted from the oldest request's arrival, for more
same-shaped requests. Under load requests are already older than the delay, so
batches form from what queued during the previous compute, with no added wait.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.util.types import AttributeValue
from redis.exceptions import NoScriptError, RedisError

from meshserve.errors import DeadlineExceeded, Internal, ResourceExhausted, Unavailable
from meshserve.models.repository import ModelInfo
from meshserve.observe.metrics import LabelMemo, WorkerMetrics
from meshserve.observe.tracing import UNTRACED, extract, records, tenant_attribute
from meshserve.queue import ClaimOptions, ModelKeys, QueueProtocol, claim_command, parse_claim, wait_command
from meshserve.settings import WorkerSettings
from meshserve.store.link import RedisLink
from meshserve.wire.envelope import OFF_LOOP_BYTES, envelope_signature, failed_reply
from model_workers.batches import Job, batch_bytes, decode, split, stack
from model_workers.compute import Compute, TurnedSlow
from model_workers.generate import Generator
from model_workers.health import ModelHealth
from model_workers.leases import Leases
from model_workers.python_stream import Stream, refuse_restarts, streams
from model_workers.sequences import keep_states, refuse_not_live, step_feeds
from model_workers.served import Served
from protos import meshserve_pb2 as mpb

log = logging.getLogger(__name__)

DRAIN_REPORT_INTERVAL_S = 1.0
"""A worker tells Redis its time per job of a model (for enqueue's shedding) with at
most one claim in this long: each report costs the claim a command, and a figure
stays fresh for ``meshserve.queue.protocol.DRAIN_FRESH_MS`` (5 s). A figure lost
meanwhile (the sweep resets an idle model) only means no shedding until the next."""


@dataclass(frozen=True, slots=True)
class Traced:
    """A batch's requests as tracing sees them (what the gateway decided, read off
    each envelope's ``traceparent``). Empty when tracing is off or none was sampled:
    then the batch has no span at all."""

    links: list[trace.Link] = field(default_factory=list)
    """Every request that brought a trace context, sampled or not: the batch span's links."""
    sampled: dict[str, otel_context.Context] = field(default_factory=dict)
    """Job id -> the context its request brought, for the sampled ones only."""

    def __bool__(self) -> bool:
        return bool(self.sampled)


UNSAMPLED = Traced()


class BatchRunner:
    """Claims, fills and runs batches; owns the per-tenant device time it measures."""

    def __init__(
        self,
        settings: WorkerSettings,
        queue: QueueProtocol,
        blocking: RedisLink,
        leases: Leases,
        compute: Compute,
        health: ModelHealth,
        metrics: WorkerMetrics,
        stopping: asyncio.Event,
        tracer: trace.Tracer,
    ) -> None:
        self._settings = settings
        self._worker_id = settings.worker_id
        self._queue = queue
        self._blocking = blocking
        self._leases = leases
        self._compute = compute
        self._health = health
        self._metrics = metrics
        self._labelled = LabelMemo()
        self._stopping = stopping
        self._tracer = tracer
        self._tracing = records(tracer)
        self._tenant_on_span = tenant_attribute(settings.trace_tenant, settings.trace_tenant_secret)
        self._tenant_device_seconds: defaultdict[tuple[str, str], float] = defaultdict(float)  # (tenant, model)
        self._drain_reported_s: dict[str, float] = {}  # model's ready key -> when a claim last carried the figure
        self._detached: set[asyncio.Task[None]] = set()  # batches computing off the serve loop
        self._generators: dict[str, Generator] = {}  # ready key -> the loop of a generating model
        # set by the worker: the serve loop looks at the model's queue again
        self.on_batch_ended: Callable[[Served], None] = lambda served: None

    def tenant_device_seconds(self) -> dict[tuple[str, str], float]:
        """Device seconds by (tenant, model): a batch's time, shared by its items."""
        return dict(self._tenant_device_seconds)

    def claim_options(
        self,
        served: Served,
        max_items: int = 0,
        *,
        signature: str = "",
        first: bool = True,
        keys: ModelKeys | None = None,
    ) -> ClaimOptions:
        """This worker's claim of ``served`` from its queue partition ``keys`` (None:
        partition 0); ``first``: a batch's first claim, which takes the lower tiers'
        turn (a fill's top-up claims do not)."""
        share = self._settings.lower_tier_share
        sequence = served.model.info.sequence
        return ClaimOptions(
            max_items=max_items or served.model.info.max_batch_size or 1,
            lease_ms=served.lease_ms(self._settings.lease_ms),
            worker_id=self._worker_id,
            signature=signature,
            lower_share_every=round(1 / share) if first and share > 0 else 0,
            batch_ms=served.batch_ms(),
            ms_per_job=self._drain_report(served, keys or served.keys),
            sequence_prefix=served.sequence_prefix if sequence is not None else "",
            sequence_idle_ms=sequence.idle_timeout_ms if sequence is not None else 0,
        )

    def _drain_report(self, served: Served, keys: ModelKeys) -> float:
        """The figure for this claim of partition ``keys`` to carry: the model's recent
        ms per job once per ``DRAIN_REPORT_INTERVAL_S``, else 0 (nothing to write).
        A worker taking from P partitions in turn drains each at 1/P of its rate, so
        each partition's figure is P times its ms per job: enqueue's estimate there
        (that partition's jobs ahead over its drain rate) is then the model's."""
        now_s = time.monotonic()
        last_s = self._drain_reported_s.get(keys.ready)
        if served.ms_per_job_avg <= 0 or (last_s is not None and now_s - last_s < DRAIN_REPORT_INTERVAL_S):
            return 0.0
        self._drain_reported_s[keys.ready] = now_s
        return served.ms_per_job_avg * len(served.partitions)

    async def claim(
        self,
        served: Served,
        max_items: int = 0,
        *,
        signature: str = "",
        first: bool = True,
        keys: ModelKeys | None = None,
    ) -> list[Job]:
        """Lease up to ``max_items`` of the model's jobs from its queue partition
        ``keys`` (None: partition 0); answer those the claim expired."""
        keys = keys or served.keys
        options = self.claim_options(served, max_items, signature=signature, first=first, keys=keys)
        claim = await self._queue.fetch_bulk(keys, await self._queue.claim(keys, **options))
        self._leases.answer_expired(served, claim, keys)
        return decode(claim, served.model.info, keys)

    async def claim_any(self, served: Served, keys: ModelKeys | None = None) -> list[Job]:
        """A batch's first claim: from partition ``keys`` when a wake-up named it, else
        from the model's partitions in turn (``Served.claim_order``) until one has work.
        One claim for a model of one partition."""
        if keys is not None:
            return await self.claim(served, keys=keys)
        for partition in served.claim_order():
            if jobs := await self.claim(served, keys=partition):
                return jobs
        return []

    async def serve_batch(
        self, served: Served, claimed: list[Job] | None = None, keys: ModelKeys | None = None
    ) -> None:
        """One batch of ``served`` (``claimed``, or claimed now from partition ``keys``,
        or from any), counted in hand until answered. A batch's jobs come from one
        queue partition (a script's keys are one Cluster slot).

        A quick model's batch runs here; any other's runs on a task of its own once
        claimed and filled, so the serve loop goes on to other models while it
        computes (``Served.at_capacity`` bounds a model's batches in hand, and
        ``on_batch_ended`` tells the loop when one ends)."""
        served.began()
        detached = False
        try:
            started_s = time.perf_counter()
            jobs = claimed if claimed is not None else await self.claim_any(served, keys)
            if not jobs:
                return
            if served.model.info.generation is not None:  # its loop owns the batch in hand from here
                detached = True
                await self._generator(served).admit(jobs)
                return
            filling_s = await self._fill_if_partial(served, jobs)
            if self._stopping.is_set():
                await self._leases.release(served, jobs)
                return
            taken = len(jobs)  # expired ones included: they cost the claim too (``_run`` drops them from jobs)
            if served.runs_inline() and batch_bytes(jobs) <= OFF_LOOP_BYTES:  # a large one: the loop goes on
                try:
                    await self._run(served, jobs)
                    served.observe_batch((time.perf_counter() - started_s - filling_s) * 1000, taken)
                    return
                except TurnedSlow:  # stopped on the loop: run again off it, the serve loop going on
                    pass
            task = asyncio.create_task(self._run_detached(served, jobs, taken, started_s, filling_s))
            self._detached.add(task)
            task.add_done_callback(self._detached.discard)
            detached = True
        except RedisError as exc:
            # Jobs it had claimed stay leased; the reaper redelivers them.
            log.warning("redis error while serving %s: %s", served.keys.ready, exc)
        finally:
            if not detached:
                served.ended()

    async def _run_detached(
        self, served: Served, jobs: list[Job], taken: int, started_s: float, filling_s: float
    ) -> None:
        try:
            try:
                await self._run(served, jobs)
            except TurnedSlow:  # decided inline here (another batch's time came in): now it is not
                await self._run(served, jobs)
            served.observe_batch((time.perf_counter() - started_s - filling_s) * 1000, taken)
        except RedisError as exc:
            log.warning("redis error while serving %s: %s", served.keys.ready, exc)
        except Exception:  # a task's error would go unseen: the leases redeliver its jobs
            log.exception("batch of %s failed outside the model run", served.keys.ready)
        finally:
            served.ended()
            self.on_batch_ended(served)

    async def running(self) -> None:
        """Return once every batch running on a task of its own has been answered
        (and every generation loop has ended)."""
        while self._detached:
            await asyncio.gather(*list(self._detached), return_exceptions=True)
        loops = [g.task for g in self._generators.values() if g.task is not None]
        await asyncio.gather(*loops, return_exceptions=True)

    def detached(self) -> list[asyncio.Task[None]]:
        """The batches computing on tasks of their own now (a decoupled Python model's
        stream among them)."""
        return list(self._detached)

    def generators(self) -> dict[str, Generator]:
        """The generation loops made so far, by the model's ready key."""
        return dict(self._generators)

    def _generator(self, served: Served) -> Generator:
        """The generation loop of ``served`` (model_workers/generate.py), made once."""
        generator = self._generators.get(served.keys.ready)
        if generator is None or generator.served is not served:
            info = served.model.info
            assert info.generation is not None

            async def taken(raw: Any) -> list[Job]:
                claim = await self._queue.fetch_bulk(served.keys, parse_claim(raw))
                self._leases.answer_expired(served, claim)
                return decode(claim, info)  # a generating model has one partition

            generator = Generator(
                served,
                info.generation,
                self._leases,
                self._queue.redis,
                self._worker_id,
                self._stopping,
                lambda room: claim_command(served.keys, **self.claim_options(served, room, first=False)),
                taken,
                lambda: self.on_batch_ended(served),
            )
            self._generators[served.keys.ready] = generator
        return generator

    async def _fill_if_partial(self, served: Served, jobs: list[Job]) -> float:
        """Fill a partial batch (``_fill``); returns the seconds spent filling."""
        info = served.model.info
        max_items = info.max_batch_size or 1
        if len(jobs) > 1 and sum(j.batch_size for j in jobs) < max_items and info.max_queue_delay_us > 0:
            filling_s = time.perf_counter()
            await self._fill(served, jobs, max_items)
            return time.perf_counter() - filling_s
        return 0.0

    async def _fill(self, served: Served, jobs: list[Job], max_items: int) -> None:
        """Top a partial batch up with same-shaped jobs until the oldest has waited the max queue delay."""
        keys = jobs[0].keys or served.keys  # the batch's partition: top-ups come from it too
        oldest_ms = min(job.request.enqueued_ms for job in jobs)
        fill_until_s = (oldest_ms + served.model.info.max_queue_delay_us / 1000) / 1000
        signature = envelope_signature(jobs[0].request, served.model.info)
        while (room := max_items - sum(j.batch_size for j in jobs)) > 0:
            remaining_s = fill_until_s - time.time()
            if remaining_s <= 0:
                return
            more = await self._wait_and_claim(served, keys, room, signature, remaining_s)
            if more:
                jobs.extend(more)
                continue
            # Woken with nothing of this shape: another shape's jobs keep the wake
            # token coming back, so blocking again would spin. Wait out the window
            # once, then take what arrived.
            await asyncio.sleep(max(0.0, fill_until_s - time.time()))
            room = max_items - sum(j.batch_size for j in jobs)
            jobs.extend(await self.claim(served, room, signature=signature, first=False, keys=keys))
            return

    async def _wait_and_claim(
        self, served: Served, keys: ModelKeys, room: int, signature: str, wait_s: float
    ) -> list[Job]:
        """Wait up to ``wait_s`` for the wake token of the queue partition ``keys``, then
        claim up to ``room`` items of ``signature`` from it: the claim rides behind the
        wait in one write (Redis runs it the moment the wait ends, on a token or at its
        timeout), so a top-up costs one round trip, not two."""
        options = self.claim_options(served, room, signature=signature, first=False, keys=keys)
        waited, claimed = await self._blocking.pipeline(
            [wait_command([keys.wake], max(wait_s, 0.001)), claim_command(keys, **options)]
        )
        if isinstance(waited, RedisError):
            raise waited
        if isinstance(claimed, NoScriptError):  # Redis lost its scripts (a restart): the plain claim loads it
            return await self.claim(served, room, signature=signature, first=False, keys=keys)
        if isinstance(claimed, RedisError):
            raise claimed
        claim = await self._queue.fetch_bulk(keys, parse_claim(claimed))
        self._leases.answer_expired(served, claim, keys)
        return decode(claim, served.model.info, keys)

    async def _run(self, served: Served, jobs: list[Job]) -> None:
        """Answer the jobs past their deadline, compute the rest, answer them.

        TurnedSlow (a quick model's inline run was stopped) leaves ``jobs`` holding
        the live jobs only, the others answered, for the caller to run again off the
        serve loop."""
        claimed_ns = time.time_ns()
        traced = _traced(jobs) if self._tracing else UNSAMPLED
        now_ms = claimed_ns // 1_000_000
        live = [job for job in jobs if job.request.deadline_ms > now_ms]
        if len(live) < len(jobs):
            served.stats.expired += len(jobs) - len(live)
            queued_too_long = DeadlineExceeded("deadline exceeded while queued")
            expired = [
                (job, failed_reply(job.job_id, queued_too_long)) for job in jobs if job.request.deadline_ms <= now_ms
            ]
            _count_failed(served, [job for job, _ in expired], claimed_ns)
            self._reply(served, expired, traced)
            jobs[:] = live
        if live and served.model.info.sequence is not None:  # steps whose sequence went meanwhile
            live, refused = refuse_not_live(served.model.info, live)
            if refused:
                _count_failed(served, [job for job, _ in refused], claimed_ns)
                self._reply(served, refused, traced)
                jobs[:] = live
        if live and streams(served.model.info):  # requests that streamed under a worker now lost
            live, refused = await refuse_restarts(self._queue.redis, served, live)
            if refused:
                _count_failed(served, [job for job, _ in refused], claimed_ns)
                self._reply(served, refused, traced)
                jobs[:] = live
        if live:
            self._reply(served, await self._compute_batch(served, live, claimed_ns, traced), traced)

    def _reply(self, served: Served, replies: list[tuple[Job, mpb.InferReply]], traced: Traced) -> None:
        if traced:  # the gateway's reply span starts here, when the reply leaves
            replied_ns = time.time_ns()
            for job, reply in replies:
                if job.job_id in traced.sampled:
                    reply.replied_unix_ns = replied_ns
        self._leases.reply_and_ack(served, replies)

    async def _compute_batch(
        self, served: Served, jobs: list[Job], claimed_ns: int, traced: Traced
    ) -> list[tuple[Job, mpb.InferReply]]:
        info = served.model.info
        total = sum(job.batch_size for job in jobs)
        with self._batch_span(info, jobs, total, traced) if traced else UNTRACED:
            # A large batch is stacked and split on a thread: the loop keeps renewing
            # leases, reporting and claiming meanwhile (OFF_LOOP_BYTES).
            feed = await asyncio.to_thread(stack, jobs) if batch_bytes(jobs) > OFF_LOOP_BYTES else stack(jobs)
            if info.sequence is not None:  # each step's state, from Redis with its claim
                feed.update(step_feeds(info.sequence, jobs, info.max_batch_size > 0))
            stacked_ns = time.time_ns()
            stream = (
                Stream(
                    served,
                    jobs,
                    self._queue.redis,
                    self._worker_id,
                    claimed_ns,
                    self._stopping,
                    self._settings.max_message_bytes,
                )
                if streams(info)
                else None
            )
            try:
                with self._compute_spans(info.name, jobs, total, traced) if traced else UNTRACED:
                    keep_leases = partial(self._leases.extend_while_computing, served, jobs)
                    last_deadline_ms = max(job.request.deadline_ms for job in jobs)
                    outputs, compute_us = await self._compute.run_batch(
                        served, feed, keep_leases, last_deadline_ms, stream.run if stream is not None else None
                    )
            except TurnedSlow:
                raise
            except (DeadlineExceeded, Unavailable) as exc:  # stopped at a time limit: not the model's failure
                log.warning("%s (a batch of %d)", exc, total, extra={"model": info.name, "version": info.version})
                served.stats.stopped += len(jobs)
                _count_failed(served, jobs, time.time_ns())
                return [(job, failed_reply(job.job_id, exc)) for job in jobs]
            except Exception as exc:  # a model failure answers its requests, never kills the worker
                log.exception("model %s failed on a batch of %d", info.name, total)
                served.stats.failed += len(jobs)
                _count_failed(served, jobs, time.time_ns())
                self._health.batch_failed(served)
                message = f"model '{info.name}' failed: {exc}"
                return [(job, failed_reply(job.job_id, Internal(message))) for job in jobs]
            self._health.batch_succeeded(served)
            if log.isEnabledFor(logging.DEBUG):  # inside the batch span: the line carries its trace id
                _log_batch(info, jobs, total, compute_us, claimed_ns)
        if info.sequence is not None:
            keep_states(info.sequence, info, jobs, outputs)
        queue_ns = self._account(served, jobs, total, compute_us, claimed_ns)
        cutting_ns = time.time_ns()
        if stream is not None:
            cut = partial(stream.finals, outputs)
        else:
            cut = partial(split, served, jobs, outputs, compute_us, claimed_ns, self._worker_id)
        replies = await asyncio.to_thread(cut) if sum(out.nbytes for out in outputs or ()) > OFF_LOOP_BYTES else cut()
        answered = [self._within_limit(info, job, reply) for job, reply in replies]
        ended_ns = time.time_ns()
        over_limit = [job for job, reply in answered if reply.code != mpb.OK]  # rare: answered with an error
        if over_limit:
            _count_failed(served, over_limit, ended_ns)
            queue_ns -= sum(max(0, claimed_ns - job.request.enqueued_ms * 1_000_000) for job in over_limit)
        served.statistics.batch_succeeded(
            total,
            len(jobs) - len(over_limit),
            queue_ns=queue_ns,
            input_ns=stacked_ns - claimed_ns,
            infer_ns=compute_us * 1000,
            output_ns=ended_ns - cutting_ns,
            ended_ns=ended_ns,
            claimed_ns=claimed_ns,
        )
        return answered

    def _within_limit(self, info: ModelInfo, job: Job, reply: mpb.InferReply) -> tuple[Job, mpb.InferReply]:
        """The reply, or RESOURCE_EXHAUSTED when its outputs pass ``max_message_bytes``:
        the gateway could not send it, and Redis should not hold it."""
        size = job.reply_bytes()
        limit = self._settings.max_message_bytes
        if size <= limit:
            return job, reply
        job.reply_data = []
        message = (
            f"model '{info.name}' answered {size} bytes of outputs, over the limit of {limit} bytes"
            " (--max-message-bytes, MESHSERVE_MAX_MESSAGE_BYTES); request fewer outputs or smaller inputs"
        )
        return job, failed_reply(job.job_id, ResourceExhausted(message, reason="message_size"))

    def _account(self, served: Served, jobs: list[Job], total: int, compute_us: int, claimed_ns: int) -> int:
        """A batch's figures: the model's counters, the metrics, each tenant's device time;
        returns the requests' summed queue time (ns, enqueue to claim)."""
        info = served.model.info
        version = str(info.version)
        compute_s = compute_us / 1e6
        served.observe_compute(compute_us / 1000)
        labelled, metrics = self._labelled, self._metrics
        labelled(metrics.batch_size, info.name, version).observe(total)
        labelled(metrics.compute, info.name, version).observe(compute_s)
        queue_wait = labelled(metrics.queue_wait, info.name, version)
        stats = served.stats
        queue_ns = 0
        for job in jobs:
            wait_ns = max(0, claimed_ns - job.request.enqueued_ms * 1_000_000)
            queue_ns += wait_ns
            wait_s = wait_ns / 1e9
            queue_wait.observe(wait_s)
            stats.queue_wait_seconds += wait_s
            # the batch's device time, shared by items: what each tenant costs
            self._tenant_device_seconds[(job.request.tenant, info.name)] += compute_s * job.batch_size / total
        stats.batches += 1
        stats.items += total
        stats.requests += len(jobs)
        stats.largest_batch = max(stats.largest_batch, total)
        stats.device_seconds += compute_s
        return queue_ns

    def _batch_span(
        self, info: ModelInfo, jobs: list[Job], total: int, traced: Traced
    ) -> AbstractContextManager[trace.Span]:
        """The batch's span, after a queue_wait span per sampled request: a root of
        its own that links them (so it is sampled: ``tracing.downstream_sampler``)."""
        tenants = self._request_spans(info.name, jobs, traced)
        attributes: dict[str, AttributeValue] = {
            "meshserve.model": info.name,
            "meshserve.version": info.version,
            "meshserve.batch_size": total,
            "meshserve.requests": len(jobs),
            "meshserve.device": self._settings.device,
            "meshserve.worker": self._worker_id,
        }
        if tenants:
            attributes["meshserve.tenancy.tenants"] = tenants
        return self._tracer.start_as_current_span(
            "batch", links=traced.links, attributes=attributes, context=otel_context.Context()
        )

    def _request_spans(self, model: str, jobs: list[Job], traced: Traced) -> list[str]:
        """A queue_wait span per sampled request, in the request's own trace; returns
        the batch's distinct tenants as spans name them."""
        tenants: set[str] = set()
        for job in jobs:
            if (named := self._tenant_on_span(job.request.tenant)) is not None:
                tenants.add(named)
            if (ctx := traced.sampled.get(job.job_id)) is None:
                continue
            span = self._tracer.start_span("queue_wait", context=ctx, start_time=job.request.enqueued_ms * 1_000_000)
            span.set_attribute("meshserve.model", model)
            span.set_attribute("meshserve.version", job.request.version)
            if named is not None:
                span.set_attribute("meshserve.tenant", named)
            span.end()  # at claim time (roughly): its length is the queue wait
        return sorted(tenants)

    @contextmanager
    def _compute_spans(self, model: str, jobs: list[Job], total: int, traced: Traced) -> Iterator[None]:
        """Around a batch's run: the batch span's ``compute`` child, current while the
        model runs, then a ``compute`` span per sampled request, in the request's own
        trace, with the same start and end, the batch size, and a link to the batch span
        (the current span on entry). A failure marks them all."""
        batch = trace.Link(trace.get_current_span().get_span_context())
        started_ns = time.time_ns()
        span = self._tracer.start_span("compute", start_time=started_ns)
        status = trace.Status(trace.StatusCode.UNSET)
        try:
            with trace.use_span(span, record_exception=False, set_status_on_exception=False):
                yield
        except Exception as exc:
            status = trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}")
            span.record_exception(exc)
            raise
        finally:
            ended_ns = time.time_ns()
            span.set_status(status)
            span.end(end_time=ended_ns)
            attributes: dict[str, AttributeValue] = {"meshserve.model": model, "meshserve.batch_size": total}
            if jobs:  # a batch holds one model version
                attributes["meshserve.version"] = jobs[0].request.version
            for job in jobs:
                if (ctx := traced.sampled.get(job.job_id)) is not None:
                    own = self._tracer.start_span(
                        "compute", context=ctx, links=[batch], attributes=attributes, start_time=started_ns
                    )
                    own.set_status(status)
                    own.end(end_time=ended_ns)


def _count_failed(served: Served, jobs: list[Job], now_ns: int) -> None:
    """Triton's fail figures for requests answered with an error at ``now_ns``."""
    served.statistics.requests_failed(len(jobs), sum(job.request.enqueued_ms for job in jobs), now_ns)


def _traced(jobs: list[Job]) -> Traced:
    """What each job's envelope says about its trace; ``UNSAMPLED`` when no job was sampled."""
    traced = Traced()
    for job in jobs:
        ctx = extract(job.request.trace_context)
        parent = trace.get_current_span(ctx).get_span_context()
        if parent.is_valid:
            traced.links.append(trace.Link(parent))
            if parent.trace_flags.sampled:
                traced.sampled[job.job_id] = ctx
    return traced if traced.sampled else UNSAMPLED


def _log_batch(info: ModelInfo, jobs: list[Job], total: int, compute_us: int, claimed_ns: int) -> None:
    """The per-batch DEBUG line; its fields ride as ``extra`` for the JSON log format.

    DEBUG, not INFO: a line per batch is a write per request at low load, on the
    critical path, and the metrics carry the same figures."""
    oldest_wait_ms = max(0.0, claimed_ns / 1e6 - min(job.request.enqueued_ms for job in jobs))
    ids = [job.request.client_request_id or job.request.id for job in jobs]  # the ids callers know
    log.debug(
        "batch of %d from %d requests for %s version %d: compute %.1f ms, oldest waited %.1f ms; requests %s",
        total,
        len(jobs),
        info.name,
        info.version,
        compute_us / 1000,
        oldest_wait_ms,
        ",".join(ids),
        extra={
            "request_ids": ids,
            "model": info.name,
            "version": info.version,
            "batch_size": total,
            "requests": len(jobs),
            "compute_ms": round(compute_us / 1000, 3),
            "queue_wait_ms": round(oldest_wait_ms, 3),
        },
    )
