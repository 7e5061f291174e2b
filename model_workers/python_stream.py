"""A decoupled Python model's batch: its responses leave as partial replies while it runs.

The batch runs as any batch (``runner.BatchRunner._compute_batch``: one execute, the
compute pool's limits, the same spans and figures), through ``PythonModel.stream``.
Each response the model yields is cut per request and written at once with
REPLY_PARTIAL (fenced by the lease, never acked; ``meshserve/queue/partials.py``),
from the compute thread through the event loop, and the model goes on only once it
is written: the responses of a request arrive in order, and a caller that went away
(ABANDON) is known before the next one. The model's last answer goes with the ack as
any reply does, flagged final.

- A caller that went away: its request leaves the batch and is acked (``CALLER_GONE``);
  when every caller of the batch has gone, the model's iterator is closed.
- A partial refused because the lease moved on (this worker stalled past it): the
  request leaves the batch; the worker holding it now answers it.
- A job that streamed before (its first worker died mid-stream) is never restarted:
  it is answered UNAVAILABLE with the count sent (``generate.restart_refused``).
- A worker told to stop closes the iterator at the next response and answers its
  requests UNAVAILABLE with the count sent (``generate.stopped_while_generating``),
  as the ``generate`` mode does: a request that streamed is not handed on.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
from redis.exceptions import NoScriptError, RedisError

from meshserve.errors import ResourceExhausted
from meshserve.models.python_backend import PYTHON
from meshserve.models.repository import ModelInfo
from meshserve.queue import load_partial_script, partial_command, streamed_counts
from meshserve.store.link import RedisLink
from meshserve.wire.envelope import failed_reply
from model_workers.batches import Job, serialize_reply, split
from model_workers.generate import CALLER_GONE, restart_refused, stopped_while_generating
from model_workers.served import Served
from protos import meshserve_pb2 as mpb

log = logging.getLogger(__name__)

PUSH_TIMEOUT_S = 30.0
"""How long the compute thread waits for one response's write (Redis gone: the run fails)."""


def streams(info: ModelInfo) -> bool:
    """Whether ``info``'s batches stream (a decoupled Python model)."""
    return info.decoupled and info.backend == PYTHON


async def refuse_restarts(
    redis: RedisLink, served: Served, jobs: list[Job]
) -> tuple[list[Job], list[tuple[Job, mpb.InferReply]]]:
    """(jobs to run, answers for those that streamed under an earlier worker)."""
    sent = await streamed_counts(redis, served.keys, [job.job_id for job in jobs])
    fresh = [job for job, count in zip(jobs, sent, strict=True) if not count]
    refused = [
        (job, failed_reply(job.job_id, restart_refused(count))) for job, count in zip(jobs, sent, strict=True) if count
    ]
    return fresh, refused


class Stream:
    """One streaming batch: which requests still listen, and how many responses went out."""

    def __init__(
        self,
        served: Served,
        jobs: list[Job],
        redis: RedisLink,
        worker_id: str,
        claimed_ns: int,
        stopping: asyncio.Event,
        max_message_bytes: int,
    ) -> None:
        self._served = served
        self._max_message_bytes = max_message_bytes
        self.refused: list[tuple[Job, mpb.InferReply]] = []  # responses over the message limit
        self._stopping = stopping
        self.stopped = False  # the worker stopped it: its requests end UNAVAILABLE
        self._jobs = list(jobs)  # the batch's rows, in order
        self._redis = redis
        self._worker_id = worker_id
        self._claimed_ns = claimed_ns
        self._loop = asyncio.get_running_loop()
        self.listening = {job.job_id for job in jobs}
        self.gone: list[Job] = []  # callers that went away: acked at the end
        self.sent = 0  # responses each listening request got
        self._responded: Callable[[], None] = lambda: None

    def run(
        self, feed: dict[str, np.ndarray[Any, Any]], options: Any, responded: Callable[[], None]
    ) -> list[np.ndarray[Any, Any]] | None:
        """The model's stream (on a stream thread); its final outputs or None.
        ``responded`` is called after each response is written (the time limit starts again)."""
        self._responded = responded
        return self._served.model.stream(feed, options, self._respond)  # type: ignore[attr-defined, no-any-return]

    def _respond(self, outputs: list[np.ndarray[Any, Any]]) -> bool:
        """Write one response to every request still listening; False when none is left
        (or the worker is stopping)."""
        replies = [(job, reply) for job, reply in self._cut(outputs, more=True) if job.job_id in self.listening]
        replies = [(job, reply) for job, reply in replies if self._within_limit(job)]
        blobs = [(job, serialize_reply(job, reply)) for job, reply in replies]
        pushed = asyncio.run_coroutine_threadsafe(self._push(blobs), self._loop).result(PUSH_TIMEOUT_S)
        for (job, _), result in zip(blobs, pushed, strict=True):
            if result <= 0:
                self.listening.discard(job.job_id)
                if result < 0:
                    self.gone.append(job)
        self.sent += 1
        self._responded()
        if self._stopping.is_set():  # read off the loop's thread: a flag, at worst one response late
            self.stopped = True
        return bool(self.listening) and not self.stopped

    def _within_limit(self, job: Job) -> bool:
        """Whether ``job``'s response fits the message limit; if not, it leaves the stream
        and ends RESOURCE_EXHAUSTED (the gateway could not send it)."""
        size = job.reply_bytes()
        if size <= self._max_message_bytes:
            return True
        self.listening.discard(job.job_id)
        message = (
            f"model '{self._served.model.info.name}' answered a response of {size} bytes of outputs, over the limit"
            f" of {self._max_message_bytes} bytes (--max-message-bytes, MESHSERVE_MAX_MESSAGE_BYTES)"
        )
        self.refused.append((job, failed_reply(job.job_id, ResourceExhausted(message, reason="message_size"))))
        return False

    def finals(self, outputs: list[np.ndarray[Any, Any]] | None) -> list[tuple[Job, mpb.InferReply]]:
        """The final reply of every request still listening (no outputs when ``outputs`` is
        None: Triton's empty final response), and ``CALLER_GONE`` for the callers that left;
        UNAVAILABLE with the count sent when the worker stopped the stream."""
        gone = [(job, failed_reply(job.job_id, CALLER_GONE)) for job in self.gone] + self.refused
        if self.stopped:
            error = stopped_while_generating(self.sent)
            return [(job, failed_reply(job.job_id, error)) for job in self._jobs if job.job_id in self.listening] + gone
        if outputs is None:
            info = self._served.model.info
            replies = [
                (job, mpb.InferReply(id=job.job_id, model=info.name, version=info.version, worker_id=self._worker_id))
                for job in self._jobs
            ]
            for job, _ in replies:
                job.reply_data = []
        else:
            replies = self._cut(outputs, more=False)
        answers = [(job, reply) for job, reply in replies if job.job_id in self.listening]
        return answers + gone

    def _cut(self, outputs: list[np.ndarray[Any, Any]], *, more: bool) -> list[tuple[Job, mpb.InferReply]]:
        replies = split(self._served, self._jobs, outputs, 0, self._claimed_ns, self._worker_id)
        for _, reply in replies:
            reply.more = more
            reply.index = self.sent
        return replies

    async def _push(self, blobs: list[tuple[Job, Any]]) -> list[int]:
        """REPLY_PARTIAL per gateway, in one pipeline: per job 1 pushed, 0 dropped, -1 gone."""
        lists: dict[str, list[tuple[Job, Any]]] = defaultdict(list)
        for job, blob in blobs:
            lists[job.request.reply_to].append((job, blob))
        keys = self._served.keys
        commands = [
            partial_command(keys, to, [(job.token, job.job_id, blob) for job, blob in group])
            for to, group in lists.items()
        ]
        if not commands:
            return []
        results = await self._redis.pipeline(commands)
        if any(isinstance(result, NoScriptError) for result in results):
            await load_partial_script(self._redis)
            results = await self._redis.pipeline(commands)
        by_job: dict[str, int] = {}
        for group, result in zip(lists.values(), results, strict=True):
            if isinstance(result, RedisError):
                raise result
            for (job, _), pushed in zip(group, result, strict=True):
                by_job[job.job_id] = int(pushed)
        return [by_job[job.job_id] for job, _ in blobs]
