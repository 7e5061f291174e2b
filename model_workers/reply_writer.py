"""A worker's reply writes: a job is acked only once its reply is in Redis.

Each gateway's list gets one script (REPLY_ACK) that pushes its replies and acks
their jobs atomically, the push first; the scripts of a batch go in one pipeline. A
push Redis refuses (``OOM`` at ``maxmemory``, ``READONLY`` after a failover, ...) is
retried with backoff for up to
``RETRY_BUDGET_S``, never past the request's deadline; meanwhile its job stays
leased. If the push still fails, the worker drops the job (its ack deletes the job's
hash, which frees the request's payload) and answers the caller UNAVAILABLE with what
happened ("queue store out of memory ..."), a reply a few hundred bytes long. So a
caller hears its result or the store's refusal within about a second of it, never a
deadline that blames the model. A lost connection is not a refusal: the lease stays
and the reaper redelivers, as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import NoScriptError, RedisError

from meshserve.errors import Unavailable
from meshserve.queue import (
    ModelKeys,
    QueueProtocol,
    ack_command,
    push_commands,
    reply_ack_commands,
    reply_ack_result,
)
from meshserve.queue.keys import SequenceKeys
from meshserve.queue.sequences import StateWrite, StepWrite, seq_reply_ack_command
from meshserve.store.link import Chunks, Command, RedisLink
from meshserve.store.refusals import LOG_INTERVAL_S, RefusalLog, refusal_kind, store_refusal_message
from meshserve.wire.envelope import failed_reply

log = logging.getLogger(__name__)

RETRY_BUDGET_S = 1.0
"""How long a refused reply is retried before its caller is told the store refused it."""

FIRST_BACKOFF_S = 0.02
MAX_BACKOFF_S = 0.2

ACK_RETRY_BUDGET_S = 3.0
"""How long an ack whose reply is written is retried (a Redis restart's outage)."""

DEADLINE_MARGIN_MS = 100
"""Give up this long before the request's deadline: the caller must hear the refusal
before its own timer answers DEADLINE_EXCEEDED."""


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One reply to write: to ``reply_to``, for job ``job_id`` whose deadline is
    ``deadline_ms`` (epoch ms); ``token`` is the lease to ack once it is written
    (None: nothing to ack, e.g. a job a sweep or a claim already took off)."""

    job_id: str
    reply_to: str
    blob: bytes | Chunks  # Chunks: framed with the outputs' buffers, not joined
    deadline_ms: int
    token: int | None
    state: StateWrite | None = None  # a stateful model's step: written with its reply and ack


class ReplyWriter:
    """Writes replies, then acks them; ``send`` starts a write, this object's
    ``refusals`` counts and logs what Redis refused."""

    def __init__(self, redis: RedisLink, queue: QueueProtocol) -> None:
        self._redis = redis
        self._queue = queue
        self.refusals = RefusalLog(log, "reply writes")
        self.dropped = 0
        """Jobs answered UNAVAILABLE because their reply could not be written."""
        self._gave_up = 0  # such jobs since the last log line, and those whose answer failed too
        self._untold = 0
        self._gave_up_logged_s = -LOG_INTERVAL_S

    def send(self, keys: ModelKeys, model: str, outgoing: Sequence[Outgoing]) -> Coroutine[Any, Any, None]:
        """Start writing ``outgoing`` now (the scripts leave before this returns)
        and return what finishes the job: confirm, retry, or give up."""
        lists = _by_list(outgoing)
        return self._finish(keys, model, lists, self._write(keys, lists))

    def _write(self, keys: ModelKeys, lists: dict[str, list[Outgoing]]) -> Awaitable[list[Any]]:
        """Write the lists' replies and ack their jobs, written now: one REPLY_ACK per
        list (a transaction where a reply is large); on a cluster (a gateway's list and
        a model's leases in two slots, which no script may touch together) the pushes,
        then the acks of what was pushed."""
        if self._redis.cluster:
            return self._push_then_ack(keys, lists, self._redis.pipeline_now(_pushes(lists)))
        per_list = _reply_acks(keys, lists)
        return _results(self._redis.pipeline_now([command for commands in per_list for command in commands]), per_list)

    async def _push_then_ack(
        self, keys: ModelKeys, lists: dict[str, list[Outgoing]], pushed: Awaitable[list[Any]]
    ) -> list[Any]:
        """The cluster's reply write: a reply is in before its job is acked (a worker
        killed between the two leaves a written reply and a lease that is redelivered;
        the gateway drops the second reply as late). Per list: RPUSH's answer or error."""
        results = (await pushed)[::2]
        await self._ack(
            keys,
            [
                o
                for group, r in zip(lists.values(), results, strict=True)
                if not isinstance(r, RedisError)
                for o in group
            ],
        )
        return results

    async def _finish(
        self, keys: ModelKeys, model: str, lists: dict[str, list[Outgoing]], written: Awaitable[list[Any]]
    ) -> None:
        try:
            results = await written
        except RedisError as exc:  # connection lost: everything is still to write
            results = [exc] * len(lists)
        pending, error = await self._settle(keys, lists, results)
        if pending:
            assert error is not None
            if refusal_kind(error) is None:  # a lost connection: the lease stays, for redelivery
                await self._give_up(keys, model, [o for group in pending.values() for o in group], error)
                return
            await self._retry(keys, model, pending, error)

    async def _settle(
        self, keys: ModelKeys, lists: dict[str, list[Outgoing]], results: list[Any]
    ) -> tuple[dict[str, list[Outgoing]], RedisError | None]:
        """Read one pipeline of REPLY_ACK scripts (one per list): ``({}, None)`` when
        every list's replies and acks went in together, else the lists still to write
        and what Redis said.

        Each script pushes first: a Redis that refuses the write (``maxmemory``,
        ``READONLY``) fails it before anything is written, so a reply is never acked
        without being written, and a worker killed between the two leaves neither.
        Scripts Redis lost (a restart) are loaded and run again, once."""
        if lost := [to for to, result in zip(lists, results, strict=True) if isinstance(result, NoScriptError)]:
            again = {to: lists[to] for to in lost}
            try:
                await self._queue.load_reply_ack_script()
                rerun = await self._write(keys, again)
            except RedisError as exc:
                rerun = [exc] * len(again)
            reran = dict(zip(again, rerun, strict=True))
            results = [reran.get(to, result) for to, result in zip(lists, results, strict=True)]
        pending: dict[str, list[Outgoing]] = {}
        error: RedisError | None = None
        for (to, group), result in zip(lists.items(), results, strict=True):
            if isinstance(result, RedisError):
                pending[to], error = group, error or result
        if error is not None:
            self.refusals.note(error)
        return pending, error

    async def _retry(self, keys: ModelKeys, model: str, pending: dict[str, list[Outgoing]], error: RedisError) -> None:
        """Write again with backoff until the budget or the earliest deadline is spent."""
        give_up_s = time.monotonic() + _budget_s(pending.values())
        backoff_s = FIRST_BACKOFF_S
        while pending and (left_s := give_up_s - time.monotonic()) > 0:
            await asyncio.sleep(min(backoff_s, left_s))
            backoff_s = min(backoff_s * 2, MAX_BACKOFF_S)
            try:
                results = await self._write(keys, pending)
            except RedisError as exc:
                results = [exc] * len(pending)
            pending, retried_error = await self._settle(keys, pending, results)
            error = retried_error or error
            if retried_error is not None and refusal_kind(retried_error) is None:
                break  # the connection went: writing once it is back could race a redelivery
        if pending:
            await self._give_up(keys, model, [o for group in pending.values() for o in group], error)

    async def _give_up(self, keys: ModelKeys, model: str, jobs: list[Outgoing], error: RedisError) -> None:
        """Drop the jobs and tell their callers what the store said, if it says anything
        (a refusal); after a lost connection the leases stay, for redelivery."""
        if refusal_kind(error) is None:
            log.warning("could not write %d replies of model '%s' (%s): left for redelivery", len(jobs), model, error)
            return
        await self._ack(keys, jobs)  # frees the jobs' payloads: room for the short answers below
        self.dropped += len(jobs)
        message = store_refusal_message(error, f"to store the result of model '{model}'")
        answers = [
            Outgoing(
                o.job_id,
                o.reply_to,
                failed_reply(o.job_id, Unavailable(message)).SerializeToString(),
                o.deadline_ms,
                None,
            )
            for o in jobs
        ]
        untold = await self._answer(answers)
        self._gave_up += len(jobs)
        self._untold += untold
        if (now_s := time.monotonic()) - self._gave_up_logged_s >= LOG_INTERVAL_S:  # not once per batch
            log.warning(
                "redis refused the replies of %d requests of model '%s' for %.1f s each (%s): answered UNAVAILABLE%s",
                self._gave_up,
                model,
                RETRY_BUDGET_S,
                error,
                f", {self._untold} of them could not be told" if self._untold else "",
            )
            self._gave_up_logged_s, self._gave_up, self._untold = now_s, 0, 0

    async def _answer(self, answers: list[Outgoing]) -> int:
        """Push short answers (nothing to ack), again with backoff until their deadline;
        how many could not be pushed."""
        lists = _by_list(answers)
        backoff_s = FIRST_BACKOFF_S
        while lists:
            commands = push_commands({to: [o.blob for o in group] for to, group in lists.items()})
            try:
                results = await self._redis.pipeline(commands)
            except RedisError as exc:
                results = [exc] * len(commands)
            lists = {
                to: group
                for (to, group), pushed in zip(lists.items(), results[::2], strict=True)
                if isinstance(pushed, RedisError)
            }
            left_s = min(o.deadline_ms for group in lists.values() for o in group) / 1000 - time.time() if lists else 0
            if left_s <= 0:
                break
            await asyncio.sleep(min(backoff_s, left_s))
            backoff_s = min(backoff_s * 2, MAX_BACKOFF_S)
        return sum(map(len, lists.values()))

    async def _ack(self, keys: ModelKeys, jobs: Iterable[Outgoing]) -> None:
        """Ack these jobs' leases, in one pipeline (reloading the script after a Redis
        restart). Their replies are written, so a failed ack is retried with backoff
        for up to ``ACK_RETRY_BUDGET_S``: across a Redis restart the lease (and its
        token) comes back from the AOF, and an ack in time spares the job a second run
        whose reply the gateway would drop as late. A stale token's ack is a no-op."""
        acks: dict[int, list[str]] = defaultdict(list)
        for job in jobs:
            if job.token is not None:
                acks[job.token].append(job.job_id)
        give_up_s = time.monotonic() + ACK_RETRY_BUDGET_S
        backoff_s = FIRST_BACKOFF_S
        while acks:
            try:
                results = await self._redis.pipeline([ack_command(keys, token, ids) for token, ids in acks.items()])
            except RedisError as exc:
                results = [exc] * len(acks)
            failed: dict[int, list[str]] = {}
            for (token, ids), result in zip(acks.items(), results, strict=True):
                if isinstance(result, NoScriptError):  # Redis lost its scripts: ack again, loading it
                    result = await self._ack_loading(keys, token, ids)
                if isinstance(result, RedisError):
                    failed[token], error = ids, result
            acks = failed
            if acks and (left_s := give_up_s - time.monotonic()) <= 0:
                count = sum(map(len, acks.values()))
                log.warning("could not ack %d requests of %s (%s): they will be redelivered", count, keys.ready, error)
                return
            if acks:
                await asyncio.sleep(min(backoff_s, left_s))
                backoff_s = min(backoff_s * 2, MAX_BACKOFF_S)

    async def _ack_loading(self, keys: ModelKeys, token: int, ids: list[str]) -> RedisError | None:
        try:
            await self._queue.ack(keys, token, ids)
        except RedisError as exc:
            return exc
        return None


def _by_list(outgoing: Iterable[Outgoing]) -> dict[str, list[Outgoing]]:
    lists: dict[str, list[Outgoing]] = defaultdict(list)
    for o in outgoing:
        lists[o.reply_to].append(o)
    return dict(lists)


def _reply_acks(keys: ModelKeys, lists: dict[str, list[Outgoing]]) -> list[list[Command]]:
    """One REPLY_ACK per list (a command, or a transaction when a reply is large):
    its replies, and the acks of its jobs that hold a lease (SEQ_REPLY_ACK when steps
    of sequences are among them: their states go in too)."""
    return [
        [_seq_reply_ack(keys, to, group)]
        if any(o.state is not None for o in group)
        else reply_ack_commands(
            keys, to, [o.blob for o in group], [(o.token, o.job_id) for o in group if o.token is not None]
        )
        for to, group in lists.items()
    ]


def _pushes(lists: dict[str, list[Outgoing]]) -> list[Command]:
    """The lists' replies as RPUSH and EXPIRE pairs, nothing acked (a cluster's first half)."""
    return push_commands({to: [o.blob for o in group] for to, group in lists.items()})


def _seq_reply_ack(keys: ModelKeys, to: str, group: list[Outgoing]) -> Command:
    """SEQ_REPLY_ACK for one list: jobs outside sequences (none, in a stateful model's
    batch) are acked as REPLY_ACK would."""
    idle_ms = next(o.state.idle_timeout_ms for o in group if o.state is not None)
    acks = [
        StepWrite(o.token, o.job_id, o.state.op, o.state.state) if o.state is not None else StepWrite(o.token, o.job_id)
        for o in group
        if o.token is not None
    ]
    return seq_reply_ack_command(keys, SequenceKeys.of(keys), idle_ms, to, [o.blob for o in group], acks)


async def _results(written: Awaitable[list[Any]], per_list: list[list[Command]]) -> list[Any]:
    """The pipeline's replies read back into one REPLY_ACK result per list."""
    replies = await written
    results, start = [], 0
    for commands in per_list:
        results.append(reply_ack_result(replies[start : start + len(commands)]))
        start += len(commands)
    return results


def _budget_s(groups: Iterable[list[Outgoing]]) -> float:
    """Seconds left to retry: ``RETRY_BUDGET_S``, or less before the earliest deadline."""
    earliest_ms = min(o.deadline_ms for group in groups for o in group)
    return min(RETRY_BUDGET_S, (earliest_ms - DEADLINE_MARGIN_MS) / 1000 - time.time())
