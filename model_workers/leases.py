"""The leases a worker holds: extend them while computing, release them on
shutdown, write replies and ack them, and reap expired ones back onto their queues."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from redis.exceptions import RedisError

from meshserve.errors import DeadlineExceeded, Internal
from meshserve.queue import ClaimedBatch, ModelKeys, QueueProtocol
from meshserve.settings import WorkerSettings
from meshserve.store.link import RedisLink
from meshserve.wire.envelope import failed_reply
from model_workers.batches import Job, by_lease, serialize_reply
from model_workers.held import HeldModels
from model_workers.reply_writer import Outgoing, ReplyWriter
from model_workers.sequences import state_write
from model_workers.served import Served
from protos import meshserve_pb2 as mpb

log = logging.getLogger(__name__)

ANSWER_DEAD_WITHIN_MS = 2_000
"""A request out of attempts is answered within this long, or given up on."""


class Leases:
    """Lease keeping and the reply/ack writes; owns every write task until ``flushed``."""

    def __init__(
        self,
        settings: WorkerSettings,
        redis: RedisLink,
        queue: QueueProtocol,
        held: HeldModels,
        stopping: asyncio.Event,
    ) -> None:
        self._lease_ms = settings.lease_ms
        self._max_attempts = settings.max_attempts
        self._queue = queue
        self._held = held
        self._stopping = stopping
        self._writes: set[asyncio.Task[None]] = set()
        self.writer = ReplyWriter(redis, queue)

    async def flushed(self) -> None:
        """Return once every reply and ack write started so far has finished."""
        if self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)

    async def reap_forever(self) -> None:
        """Sweep expired leases back onto their queues, every half lease.

        Every worker runs this; REAP is atomic and idempotent, so sweeps by many
        workers at once are safe, and any one live worker is enough.
        """
        interval_s = self._lease_ms / 2000
        while not self._stopping.is_set():
            for served in list(self._held.served.values()):
                try:
                    await self._reap(served)
                except RedisError as exc:
                    log.warning("reaper: redis error for %s: %s", served.keys.ready, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval_s)

    async def _reap(self, served: Served) -> None:
        for keys in served.partitions:  # each queue partition has leases of its own
            await self._reap_partition(served, keys)

    async def _reap_partition(self, served: Served, keys: ModelKeys) -> None:
        reaped = await self._queue.reap(keys, max_attempts=self._max_attempts)
        if reaped.requeued:
            served.stats.redelivered += reaped.requeued
            log.warning("redelivering %d requests of %s from expired leases", reaped.requeued, keys.ready)
        if not reaped.dead:
            return
        served.stats.failed += len(reaped.dead)
        answer_by_ms = int(time.time() * 1000) + ANSWER_DEAD_WITHIN_MS  # their deadlines are not at hand
        outgoing = []
        for job_id, reply_to, attempts in reaped.dead:
            message = f"model '{served.model.info.name}' crashed on this input {attempts} times"
            blob = failed_reply(job_id, Internal(message)).SerializeToString()
            outgoing.append(Outgoing(job_id, reply_to, blob, answer_by_ms, None))
        self._send_replies(served, keys, outgoing)

    async def extend_while_computing(self, served: Served, jobs: list[Job]) -> None:
        """Extend the leases of a computing batch every third of a lease (the model's
        own, ``Served.lease_ms``), until cancelled."""
        lease_ms = served.lease_ms(self._lease_ms)
        while True:
            await asyncio.sleep(lease_ms / 3000)
            for (keys, token), ids in by_lease(jobs, served.keys).items():
                with contextlib.suppress(RedisError):
                    await self._queue.extend(keys, token, ids, lease_ms)

    async def release(self, served: Served, jobs: list[Job]) -> None:
        """Stopping: give back jobs taken but not started, at once (not after the lease)."""
        for (keys, token), ids in by_lease(jobs, served.keys).items():
            await self._queue.release(keys, token, ids)
        log.info("released %d requests of %s on shutdown", len(jobs), served.keys.ready)

    def answer_expired(self, served: Served, claim: ClaimedBatch, keys: ModelKeys | None = None) -> None:
        """Jobs the claim script found past their deadline (in the queue partition
        ``keys``; None: the model's only one): answer them, never compute them."""
        if not claim.expired:
            return
        served.stats.expired += len(claim.expired)
        served.statistics.expired_unread(len(claim.expired), claim.now_ms)
        outgoing = []
        for job_id, reply_to in claim.expired:
            blob = failed_reply(job_id, DeadlineExceeded("deadline exceeded while queued")).SerializeToString()
            outgoing.append(Outgoing(job_id, reply_to, blob, claim.now_ms, None))  # past its deadline already
        self._send_replies(served, keys or served.keys, outgoing)

    def reply_and_ack(self, served: Served, replies: list[tuple[Job, mpb.InferReply]]) -> None:
        """Answer a batch's jobs and ack their leases once written (``_send_replies``)."""
        by_partition: dict[ModelKeys, list[Outgoing]] = {}
        for job, reply in replies:  # a batch is claimed from one partition: one group, nearly always
            by_partition.setdefault(job.keys or served.keys, []).append(
                Outgoing(
                    job.job_id,
                    job.request.reply_to,
                    serialize_reply(job, reply),
                    job.request.deadline_ms,
                    job.token,
                    state_write(served.model.info, job),
                )
            )
        for keys, outgoing in by_partition.items():
            self._send_replies(served, keys, outgoing)

    def _send_replies(self, served: Served, keys: ModelKeys, outgoing: list[Outgoing]) -> None:
        """Write replies, then ack the jobs whose reply was written (``ReplyWriter``).
        The pushes leave now, not once the serve loop next yields: the callers hear
        back without waiting for the next claim to be prepared. A task of this
        object's finishes the write (``flushed`` waits for it)."""
        task = asyncio.create_task(self.writer.send(keys, served.model.info.name, outgoing))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
