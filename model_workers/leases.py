"""The leases a worker holds: extend them while computing, release them on
shutdown, write replies and ack them, and reap expired ones back onto their queues."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any

from redis.exceptions import NoScriptError, RedisError

from meshserve.errors import DeadlineExceeded, Internal
from meshserve.queue import ClaimedBatch, QueueProtocol, finish_commands
from meshserve.settings import WorkerSettings
from meshserve.store.link import Chunks, RedisLink
from meshserve.wire.envelope import failed_reply
from model_workers.batches import Job, by_token, serialize_reply
from model_workers.held import HeldModels
from model_workers.served import Served
from protos import meshserve_pb2 as mpb

log = logging.getLogger(__name__)


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
        self._redis = redis
        self._queue = queue
        self._held = held
        self._stopping = stopping
        self._writes: set[asyncio.Task[None]] = set()

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
        reaped = await self._queue.reap(served.keys, max_attempts=self._max_attempts)
        if reaped.requeued:
            served.stats.redelivered += reaped.requeued
            log.warning("redelivering %d requests of %s from expired leases", reaped.requeued, served.keys.ready)
        if not reaped.dead:
            return
        served.stats.failed += len(reaped.dead)
        blobs: dict[str, list[bytes]] = defaultdict(list)
        for job_id, reply_to, attempts in reaped.dead:
            message = f"model '{served.model.info.name}' crashed on this input {attempts} times"
            reply = failed_reply(job_id, Internal(message))
            blobs[reply_to].append(reply.SerializeToString())
        self._send_replies(served, blobs, {})

    async def extend_while_computing(self, served: Served, jobs: list[Job]) -> None:
        """Extend the leases of a computing batch every third of a lease, until cancelled."""
        while True:
            await asyncio.sleep(self._lease_ms / 3000)
            for token, ids in by_token(jobs).items():
                with contextlib.suppress(RedisError):
                    await self._queue.extend(served.keys, token, ids, self._lease_ms)

    async def release(self, served: Served, jobs: list[Job]) -> None:
        """Stopping: give back jobs taken but not started, at once (not after the lease)."""
        for token, ids in by_token(jobs).items():
            await self._queue.release(served.keys, token, ids)
        log.info("released %d requests of %s on shutdown", len(jobs), served.keys.ready)

    def answer_expired(self, served: Served, claim: ClaimedBatch) -> None:
        """Jobs the claim script found past their deadline: answer them, never compute them."""
        if not claim.expired:
            return
        served.stats.expired += len(claim.expired)
        blobs: dict[str, list[bytes]] = defaultdict(list)
        for job_id, reply_to in claim.expired:
            reply = failed_reply(job_id, DeadlineExceeded("deadline exceeded while queued"))
            blobs[reply_to].append(reply.SerializeToString())
        self._send_replies(served, blobs, {})

    def reply_and_ack(self, served: Served, replies: list[tuple[Job, mpb.InferReply]]) -> None:
        """Answer a batch's jobs and ack their leases (``_send_replies``)."""
        blobs: dict[str, list[bytes | Chunks]] = defaultdict(list)
        for job, reply in replies:
            blobs[job.request.reply_to].append(serialize_reply(job, reply))
        self._send_replies(served, blobs, by_token([job for job, _ in replies]))

    def _send_replies(
        self, served: Served, blobs: Mapping[str, Sequence[bytes | Chunks]], acks: dict[int, list[str]]
    ) -> None:
        """Write replies, then ack, in one pipelined round trip (replies first: an
        ack never precedes its reply). The write leaves now, not once the serve loop
        next yields: the callers hear back without waiting for the next claim to be
        prepared. A task of this object's reads the results (``flushed`` waits for it)."""
        commands = finish_commands(served.keys, blobs, acks)
        task = asyncio.create_task(self._check_written(served, self._redis.pipeline_now(commands), blobs, acks))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _check_written(
        self,
        served: Served,
        written: Awaitable[list[Any]],
        blobs: Mapping[str, Sequence[bytes | Chunks]],
        acks: dict[int, list[str]],
    ) -> None:
        try:
            results = await written
            if any(isinstance(result, NoScriptError) for result in results):
                for token, ids in acks.items():  # Redis lost its scripts: ack again, loading it
                    await self._queue.ack(served.keys, token, ids)
            elif failed := next((r for r in results if isinstance(r, RedisError)), None):
                raise failed
        except RedisError:
            # The lease stays in Redis; the reaper redelivers (TODO(#4)).
            log.exception("could not write %d replies for %s", sum(map(len, blobs.values())), served.keys.ready)
