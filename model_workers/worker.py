"""The worker's core: block for work, claim a batch, run it, reply, ack.

One worker process serves one device. It holds every model the router assigns it,
blocks on the models' wake lists (never polls), claims a batch with one atomic
script, runs it on ONNX Runtime (on the event loop's own thread when the model is
quick, else on a thread of its own while the loop extends the batch's leases),
then writes replies and acks the lease in one pipelined round trip.

Batching policy: a lone request on an idle worker runs at once. When a claim
finds several requests but fewer than the max batch, the worker waits up to the
model's max queue delay, counted from the oldest request's arrival, for more
same-shaped requests. Under load requests are already older than the delay, so
batches form from what queued during the previous compute, with no added wait.

The worker's parts: ``state`` (what they share), ``leases`` (extend, release,
reply and ack, reap), ``health`` (readiness, canary, failure counting),
``placement`` (reports and live placement), ``batches`` (feeds and replies as data);
this module holds the serve loop and puts the parts together in ``Worker``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from contextlib import AbstractContextManager
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.util.types import AttributeValue
from redis.exceptions import RedisError

from meshserve.errors import DeadlineExceeded, Internal
from meshserve.models.repository import ModelInfo
from meshserve.observe.tracing import UNTRACED, extract
from meshserve.queue import ClaimOptions, claim_command, parse_claim, wait_command, woken_key
from meshserve.wire.envelope import envelope_signature, failed_reply
from model_workers.batches import Job, decode, split, stack
from model_workers.health import Health
from model_workers.leases import Leases
from model_workers.placement import Placement
from model_workers.served import ModelStats, Served
from model_workers.state import WAKE_SAFETY_TIMEOUT_S
from protos import meshserve_pb2 as mpb

__all__ = ["ModelStats", "Worker"]

log = logging.getLogger(__name__)


class Worker(Placement, Health, Leases):
    """A worker's plain core. ``serve`` owns the serve loop; ``stop`` drains it."""

    # ------------------------------------------------------------ lifecycle

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
            await self.queue.forget_worker(self.worker_id)
        self._executor.shutdown(wait=True)
        self._loader.shutdown(wait=False, cancel_futures=True)  # a load in progress ends on its own

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
            # The claim rides behind the blocking pop: Redis runs it the moment the pop
            # returns, so a wake-up and its claim cost one round trip, not two.
            ahead = self._claim_ahead()
            commands = [wait_command([*self._by_wake, self._wake_self], WAKE_SAFETY_TIMEOUT_S)]
            if ahead is not None:
                commands.append(claim_command(ahead.keys, **self._claim_options(ahead)))
            self._blocked = asyncio.ensure_future(self.blocking.pipeline(commands))
            self.idle.set()
            replies: list[Any] = []
            try:
                replies = await self._blocked
                if isinstance(replies[0], RedisError):
                    raise replies[0]
                popped = replies[0]
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
            if ahead is not None and len(replies) > 1:
                targets = await self._run_claimed_ahead(ahead, replies[1], targets)

    def _claim_ahead(self) -> Served | None:
        """The model to claim for right after the next wake-up: the only one held, or
        the one woken last (a wrong guess costs one empty claim inside Redis)."""
        if len(self._by_wake) == 1:
            return next(iter(self._by_wake.values()))
        last = self._last_woken
        return last if last is not None and self._claims(last) else None

    async def _run_claimed_ahead(self, served: Served, reply: Any, targets: list[Served]) -> list[Served]:
        """Run what the claim behind the wake-up took; the models still to look at."""
        if isinstance(reply, RedisError):  # e.g. NOSCRIPT after a Redis restart: the plain claim loads it
            log.debug("claim after wake-up for %s failed: %s", served.keys.ready, reply)
            return targets
        claim = parse_claim(reply)
        self._answer_expired(served, claim)
        jobs = decode(claim, served.model.info)
        if not self._claims(served):  # dropped while we waited: give them back at once
            await self._release(served, jobs)
            return targets
        if jobs:
            await self._serve_batch(served, jobs)
        # Its queue was looked at after the wake-up; if work remains, the claim left a
        # wake token, so the next wait returns at once.
        return [t for t in targets if t is not served]

    async def _take_from(self, targets: list[Served]) -> None:
        for served in targets:
            if self._claims(served):  # not dropped since it was woken
                await self._serve_batch(served)

    async def _serve_batch(self, served: Served, claimed: list[Job] | None = None) -> None:
        """One batch of ``served`` (``claimed``, or claimed now), marked busy while in hand."""
        served.idle.clear()
        try:
            await self._take_and_run(served, claimed)
        except RedisError as exc:
            # Jobs it had claimed stay leased; the reaper redelivers them.
            log.warning("redis error while serving %s: %s", served.keys.ready, exc)
        finally:
            served.idle.set()

    async def _woken(self, popped: Any) -> list[Served]:
        """The models to look at after a wait: the one woken, or every one."""
        key = woken_key(popped)
        if key is None or key == self._wake_self:
            self._rescan = False
            return list(self._by_wake.values())
        if (served := self._by_wake.get(key)) is not None:
            self._last_woken = served
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

    def _claim_options(
        self, served: Served, max_items: int = 0, *, signature: str = "", first: bool = True
    ) -> ClaimOptions:
        """This worker's claim of ``served``; ``first``: a batch's first claim, which
        takes the lower tiers' turn (a fill's top-up claims do not)."""
        share = self.settings.lower_tier_share
        return ClaimOptions(
            max_items=max_items or served.model.info.max_batch_size or 1,
            lease_ms=self.settings.lease_ms,
            worker_id=self.worker_id,
            signature=signature,
            lower_share_every=round(1 / share) if first and share > 0 else 0,
            batch_ms=served.batch_ms(),
            ms_per_job=served.ms_per_job_avg,
        )

    async def _claim(self, served: Served, max_items: int = 0, *, signature: str = "", first: bool = True) -> list[Job]:
        """Lease up to ``max_items`` of the model's jobs; answer those the claim expired."""
        options = self._claim_options(served, max_items, signature=signature, first=first)
        claim = await self.queue.claim(served.keys, **options)
        self._answer_expired(served, claim)
        return decode(claim, served.model.info)

    async def _take_and_run(self, served: Served, claimed: list[Job] | None = None) -> None:
        """Claim a batch (unless ``claimed`` holds one already), fill it, run it."""
        info = served.model.info
        max_items = info.max_batch_size or 1
        started_s = time.perf_counter()
        jobs = claimed if claimed is not None else await self._claim(served)
        if not jobs:
            return
        filling_s = 0.0
        if len(jobs) > 1 and sum(j.batch_size for j in jobs) < max_items and info.max_queue_delay_us > 0:
            filling_s = time.perf_counter()
            await self._fill(served, jobs, max_items)
            filling_s = time.perf_counter() - filling_s
        if self._stopping.is_set():
            await self._release(served, jobs)
            return
        await self._run(served, jobs)
        served.observe_batch((time.perf_counter() - started_s - filling_s) * 1000, len(jobs))

    async def _fill(self, served: Served, jobs: list[Job], max_items: int) -> None:
        """Top a partial batch up with same-shaped jobs until the oldest has waited the max queue delay."""
        oldest_ms = min(job.request.enqueued_ms for job in jobs)
        fill_until_s = (oldest_ms + served.model.info.max_queue_delay_us / 1000) / 1000
        signature = envelope_signature(jobs[0].request, served.model.info)
        while (room := max_items - sum(j.batch_size for j in jobs)) > 0:
            remaining_s = fill_until_s - time.time()
            if remaining_s <= 0:
                return
            await self.blocking.execute(*wait_command([served.keys.wake], max(remaining_s, 0.001)))
            more = await self._claim(served, room, signature=signature, first=False)
            if more:
                jobs.extend(more)
                continue
            # Woken with nothing of this shape: another shape's jobs keep the wake
            # token coming back, so blocking again would spin. Wait out the window
            # once, then take what arrived.
            await asyncio.sleep(max(0.0, fill_until_s - time.time()))
            room = max_items - sum(j.batch_size for j in jobs)
            jobs.extend(await self._claim(served, room, signature=signature, first=False))
            return

    async def _run(self, served: Served, jobs: list[Job]) -> None:
        claimed_ns = time.time_ns()
        now_ms = claimed_ns // 1_000_000
        live = [job for job in jobs if job.request.deadline_ms > now_ms]
        replies: list[tuple[Job, mpb.InferReply]] = [
            (job, failed_reply(job.job_id, DeadlineExceeded("deadline exceeded while queued")))
            for job in jobs
            if job.request.deadline_ms <= now_ms
        ]
        served.stats.expired += len(jobs) - len(live)
        if live:
            replies.extend(await self._compute(served, live, claimed_ns))
        self._spawn_reply(served, replies)

    async def _compute(self, served: Served, jobs: list[Job], claimed_ns: int) -> list[tuple[Job, mpb.InferReply]]:
        info = served.model.info
        total = sum(job.batch_size for job in jobs)
        with self._batch_span(info, jobs, total) if self.tracing else UNTRACED:
            feed = stack(jobs)
            try:
                with self.tracer.start_as_current_span("compute") if self.tracing else UNTRACED:
                    outputs, compute_us = await self._run_model(served, jobs, feed)
            except Exception as exc:  # a model failure answers its requests, never kills the worker
                log.exception("model %s failed on a batch of %d", info.name, total)
                served.stats.failed += len(jobs)
                self._count_failure(served)
                message = f"model '{info.name}' failed: {exc}"
                return [(job, failed_reply(job.job_id, Internal(message))) for job in jobs]
            served.consecutive_failures = 0
            if log.isEnabledFor(logging.DEBUG):  # inside the batch span: the line carries its trace id
                _log_batch(info, jobs, total, compute_us, claimed_ns)
        version = str(info.version)
        compute_s = compute_us / 1e6
        served.observe_compute(compute_us / 1000)
        labelled = self._labelled
        labelled(self.metrics.batch_size, info.name, version).observe(total)
        labelled(self.metrics.compute, info.name, version).observe(compute_s)
        queue_wait = labelled(self.metrics.queue_wait, info.name, version)
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
        return split(served, jobs, outputs, compute_us, claimed_ns, self.worker_id)

    async def _run_model(self, served: Served, jobs: list[Job], feed: dict[str, Any]) -> tuple[list[Any], int]:
        """Run one batch: on this thread if the model is quick (``Served.runs_inline``),
        else on the ONNX Runtime thread with the batch's leases extended meanwhile.
        Returns the outputs and the run's time in µs, timed once the device lock is
        held: a canary in progress finishes first, and its time is not the batch's."""
        async with self._device:
            started_ns = time.time_ns()
            if served.runs_inline():
                outputs = served.model.run(feed)
            else:
                heartbeat = asyncio.create_task(self._heartbeat(served, jobs))
                try:
                    outputs = await asyncio.get_running_loop().run_in_executor(self._executor, served.model.run, feed)
                finally:
                    heartbeat.cancel()
            return outputs, (time.time_ns() - started_ns) // 1000

    def _batch_span(self, info: ModelInfo, jobs: list[Job], total: int) -> AbstractContextManager[trace.Span]:
        """The batch's span, after a queue_wait span per request: a root of its own,
        sampled iff a request it links was (``telemetry.downstream_sampler``)."""
        links, tenants = self._request_spans(info.name, jobs)
        attributes: dict[str, AttributeValue] = {
            "meshserve.model": info.name,
            "meshserve.version": info.version,
            "meshserve.batch_size": total,
            "meshserve.requests": len(jobs),
            "meshserve.device": self.settings.device,
            "meshserve.worker": self.worker_id,
        }
        if tenants:
            attributes["meshserve.tenancy.tenants"] = tenants
        return self.tracer.start_as_current_span(
            "batch", links=links, attributes=attributes, context=otel_context.Context()
        )

    def _request_spans(self, model: str, jobs: list[Job]) -> tuple[list[trace.Link], list[str]]:
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


def _log_batch(info: ModelInfo, jobs: list[Job], total: int, compute_us: int, claimed_ns: int) -> None:
    """The per-batch DEBUG line; its fields ride as ``extra`` for the JSON log format.

    DEBUG, not INFO: a line per batch is a write per request at low load (about
    0.1 ms on the critical path), and the metrics carry the same figures."""
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
