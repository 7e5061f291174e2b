"""The queue protocol: every Redis call of the request path on a model's queue.

Scheduling. Tiers are strict, except that every Nth claim (``lower_share``) serves a
lower tier that has work, in rotation, so no tier starves. Inside a tier, tenants
share by weight with start-time fair queuing: a job's virtual start is
``max(clock[tier], finish[tenant])`` and moves the tenant's finish on by
``items / weight``; claims take the lowest start and advance the tier's clock to
it. A tenant that floods only pushes its own jobs back. Scores are written with
17 significant digits (Lua's default keeps 14), so starts keep about 1/2000 of an
item of resolution up to 2^40 items of history.

Shedding. A request the queue cannot serve before its deadline is refused at
enqueue (RESOURCE_EXHAUSTED, answered at once) instead of waiting until its deadline
for nothing: the jobs ahead of it (lower scores: its tier's earlier starts and every
higher tier) divided by the model's drain rate (the sum of its workers' recent
jobs per ms) estimate its wait. A flooding tenant's own jobs start late in virtual
time, so its excess is refused while a neighbour's requests are still admitted.
With no fresh drain figure, or nothing ahead, nothing is refused. Claims drop what
the estimate let through but that still cannot finish.

Waking. Workers block on the wake lists of the models they serve (never poll); each
also blocks on its own list (:func:`meshserve.queue.keys.worker_wake_key`): a token
there means "the set of models you serve changed", so its wait starts again on the
new set.

Time inside scripts comes from Redis ``TIME``; deadlines are absolute epoch
milliseconds set by the gateway (hosts are assumed NTP-synchronised).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Required, TypedDict, Unpack

import hiredis
from redis.exceptions import NoScriptError, RedisError, ResponseError

from meshserve.queue.keys import ModelKeys, worker_wake_key
from meshserve.queue.replies import REPLY_TTL_S
from meshserve.queue.scripts import (
    ACK,
    CLAIM,
    ENQUEUE,
    EXTEND,
    REAP,
    RELEASE,
    REPLY_ACK,
    REWAKE,
    SEQ_REPLY_ACK,
    WITHDRAW,
)
from meshserve.store.link import Arg, Chunks, Command, RedisLink, as_redis_error

JOB_TTL_GRACE_MS = 60_000
"""A job hash outlives its deadline by this much, so a lost one is reclaimed."""

LUA_PAYLOAD_BYTES = 32 << 10
"""A payload larger than this goes into its job hash's field ``b`` with a plain HSET
beside ENQUEUE, and a worker reads it with HGET after CLAIM: handed to Lua, Redis
copies it into the script's heap and out again, and holds those copies until Lua's
collector runs. Measured on a 2-core machine (docs/performance.md), a 110 KB payload
cost Redis about twice the CPU through Lua as beside it; the two meet near 30 KB."""

KEY_PAYLOAD_BYTES = 4 << 10
"""Where every worker reads payload keys (``RoutingTable.payload_keys``), a payload
larger than this goes into a string key of its own, ``<job key>:p``: one plain SET
with the job's expiry, pipelined ahead of ENQUEUE, and one MGET for a whole batch
after CLAIM. Redis keeps a large string argument as the value itself; through Lua
it is copied into the script's heap and out again, and a large hash field costs a
copy each way too. Measured on Redis 7.0 (INFO commandstats, ``docs/performance.md``):
a 12 KB payload cost 58 µs at ENQUEUE and 39 µs per job at a batch-of-8 CLAIM
(21 and 19 with 100 bytes), against 1 µs for the SET and 3 µs per job for the MGET;
a 110 KB one 63 µs for HSET into the hash and 67 µs for HGET, against 2.4 and 8.
Those are command times; Redis's whole CPU, its sockets included, falls by about
5 to 10 % for such payloads (``python -m meshserve_bench.script_cost``). Below a few
KB the copies cost less than the worker's extra round trip."""

DRAIN_FRESH_MS = 5_000
"""A worker's drain figure counts for shedding this long after its last claim."""


@dataclass(frozen=True, slots=True)
class Reaped:
    """What one REAP did: jobs put back, and jobs out of attempts (id, reply_to, attempts)."""

    requeued: int
    dead: list[tuple[str, str, int]]


@dataclass(frozen=True, slots=True)
class ClaimedStep:
    """A claimed job's sequence (a stateful model's step): its member, its flags
    ('s' starts the sequence, 'e' ends it) and its state before the step, the
    state outputs' bytes (b"": the initial state); None when the sequence is not
    live (never started, ended, or idle past the model's timeout)."""

    member: str
    flags: str
    state: bytes | None


@dataclass(frozen=True, slots=True)
class ClaimedBatch:
    """What one CLAIM returned: the lease token, Redis time, jobs and expired jobs,
    and the steps among the jobs (job id -> its sequence) of a stateful model."""

    token: int
    now_ms: int
    jobs: list[tuple[str, bytes]]
    expired: list[tuple[str, str]]
    steps: dict[str, ClaimedStep] = field(default_factory=dict)


class ClaimOptions(TypedDict, total=False):
    """A claim's options. With ``lower_share_every`` N > 0, every Nth claim of the
    model serves a lower tier that has work (the lower tiers take turns), so none
    starves. ``batch_ms`` is how long the batch is expected to take: a job whose
    deadline comes sooner is expired instead of taken. ``ms_per_job`` is the
    worker's recent time per job of this model, recorded for enqueue's shedding.
    ``scan_limit`` is how far past the head to look for same-shaped jobs."""

    max_items: Required[int]
    lease_ms: Required[int]
    worker_id: Required[str]
    signature: str  # '' = the head's shape
    scan_limit: int
    lower_share_every: int
    batch_ms: int
    ms_per_job: float
    sequence_prefix: str  # a stateful model's sequence state key prefix; '' (default): none
    sequence_idle_ms: int


@dataclass(frozen=True, slots=True)
class Enqueued:
    """ENQUEUE's answer. ``code``: 1 enqueued, 0 a duplicate id (an idempotent
    retry), -1 the model's queue is full, -2 the tenant's queue for this model is
    full, -3 the request would wait past its deadline. ``wait_ms``: the estimated
    wait behind the jobs ahead (0 when there was nothing to estimate, or when the
    whole queue would fit before the deadline, so nothing ahead was counted)."""

    code: int
    wait_ms: int

    ENQUEUED = 1
    DUPLICATE = 0
    MODEL_QUEUE_FULL = -1
    TENANT_QUEUE_FULL = -2
    PAST_DEADLINE = -3
    NO_PAYLOAD = -4  # a large payload's write was refused: raised, never returned


class QueueProtocol:
    """The queue's calls on one (non-blocking) link; every call is one round trip.

    Scripts run by SHA; the link loads one and runs it again on NOSCRIPT, so a
    restarted Redis is handled transparently. Blocking waits need a link of their
    own: they go through :func:`wait_command` and :mod:`meshserve.queue.replies`.
    """

    def __init__(self, redis: RedisLink) -> None:
        self.redis = redis

    async def enqueue(
        self,
        keys: ModelKeys,
        job_id: str,
        *,
        tier: int,
        payload: bytes | Chunks,
        deadline_ms: int,
        tenant: str,
        reply_to: str,
        signature: str,
        max_queue_size: int,
        items: int = 1,
        weight: float = 1.0,
        tenant_max_queued: int = 0,
        step: tuple[str, str] | None = None,
        payload_key: bool = False,
    ) -> Enqueued:
        """Put one job on a model's ready set, or refuse it (see :class:`Enqueued`).

        ``items`` is the request's batch size: claims fill batches by items, not
        jobs, and fair queuing charges a tenant ``items / weight`` per job. A
        payload over ``LUA_PAYLOAD_BYTES`` is written beside the script, with the
        job's time to live, in one transaction pipelined ahead of it (still one
        round trip). ``step``: a stateful model's step, (its sequence's member,
        flags: 's' starts the sequence, 'e' ends it). ``payload_key``: every worker
        reads payload keys, so one over ``KEY_PAYLOAD_BYTES`` goes into its own key
        (SET ... NX PXAT, pipelined ahead; NX keeps a duplicate's first payload).
        """
        size = payload.nbytes if isinstance(payload, Chunks) else len(payload)
        keyed = payload_key and size > KEY_PAYLOAD_BYTES
        bulk = not keyed and size > LUA_PAYLOAD_BYTES
        script_keys: list[Arg] = [keys.ready, keys.job(job_id), keys.wake, keys.sched, keys.queued, keys.drain]
        args: list[Arg] = [
            job_id,
            tier,
            b"" if bulk or keyed else payload,
            deadline_ms,
            tenant,
            reply_to,
            signature,
            max_queue_size,
            JOB_TTL_GRACE_MS,
            items,
            weight,
            tenant_max_queued,
            DRAIN_FRESH_MS,
            2 if keyed else 1 if bulk else 0,
        ]
        if step is not None:
            args.extend(step)
        if keyed:
            script_keys.append(keys.payload(job_id))
            write = ("SET", script_keys[-1], payload, "NX", "PXAT", deadline_ms + JOB_TTL_GRACE_MS)
            for _ in range(2):
                enqueued = await self._enqueue_beside([write], script_keys, args)
                if enqueued.code != Enqueued.NO_PAYLOAD:
                    return enqueued
                # NX kept the payload of a job with this id, and that job finished before
                # the script ran: its key is gone now, so the write takes this time.
            raise ResponseError(f"the payload of job {job_id} was not written")
        if not bulk:
            code, wait_ms = await self.redis.script(ENQUEUE, keys=script_keys, args=args)
            return Enqueued(int(code), int(wait_ms))
        # The payload's transaction and the script leave in one write (one round trip).
        # A transaction Redis refuses writes no field 'b', and the script then queues
        # nothing (it answers NO_PAYLOAD): the refusal is raised.
        job_key = keys.job(job_id)
        transaction: list[Command] = [
            ("MULTI",),
            ("HSET", job_key, "b", payload),
            ("PEXPIREAT", job_key, deadline_ms + JOB_TTL_GRACE_MS),
            ("EXEC",),
        ]
        return await self._enqueue_beside(transaction, script_keys, args)

    async def _enqueue_beside(
        self, writes: Sequence[Command], script_keys: Sequence[Arg], args: Sequence[Arg]
    ) -> Enqueued:
        """ENQUEUE behind the commands that wrote its payload, in one round trip. A
        refused write leaves no payload, and the script then queues nothing (it
        answers NO_PAYLOAD): the refusal is raised."""
        written = await self.redis.pipeline([*writes, ENQUEUE.call(script_keys, args)])
        if failed := next((r for r in written[:-1] if isinstance(r, RedisError)), None):
            raise failed
        reply = written[-1]
        if isinstance(reply, NoScriptError):  # Redis lost its scripts (a restart): the payload is in; load, run
            reply = await self.redis.script(ENQUEUE, keys=script_keys, args=args)
        elif isinstance(reply, RedisError):
            raise reply
        code, wait_ms = reply
        return Enqueued(int(code), int(wait_ms))

    async def claim(self, keys: ModelKeys, **options: Unpack[ClaimOptions]) -> ClaimedBatch:
        """Lease up to ``max_items`` same-shaped jobs from the head of the queue
        (the options are :class:`ClaimOptions`)."""
        return parse_claim(await self.redis.script(CLAIM, *_claim_keys_args(keys, **options)))

    async def fetch_bulk(self, keys: ModelKeys, claim: ClaimedBatch) -> ClaimedBatch:
        """``claim`` with the payloads that wait beside their job's hash (see
        :meth:`enqueue`) read in: their own keys with one MGET, in one round trip;
        nothing to read: the same claim. Those not found there were written by an
        older gateway into the hash's field ``b``, read with HGET in a second round
        trip (a mesh of mixed versions only). A job whose payload is gone meanwhile
        (withdrawn, expired) is left out: there is nothing to run, and its lease lapses."""
        missing = [job_id for job_id, payload in claim.jobs if not payload]
        if not missing:
            return claim
        found = await self.redis.execute("MGET", *(keys.payload(job_id) for job_id in missing))
        bulks = dict(zip(missing, found, strict=True))
        if older := [job_id for job_id in missing if bulks[job_id] is None]:
            fields = await self.redis.pipeline([("HGET", keys.job(job_id), "b") for job_id in older])
            if failed := next((r for r in fields if isinstance(r, RedisError)), None):
                raise failed
            bulks.update(zip(older, fields, strict=True))
        jobs = [(job_id, payload or bulks[job_id]) for job_id, payload in claim.jobs]
        return ClaimedBatch(claim.token, claim.now_ms, [(i, p) for i, p in jobs if p], claim.expired, claim.steps)

    async def ack(self, keys: ModelKeys, token: int, job_ids: list[str]) -> int:
        """Remove finished jobs of the lease ``token``; returns how many were still held."""
        if not job_ids:
            return 0
        return int(await self.redis.script(ACK, *_ack_keys_args(keys, token, job_ids)))

    async def load_ack_script(self) -> None:
        """Load the ack scripts now, so that pipelines calling :func:`ack_command` and
        :func:`reply_ack_command` find them."""
        await self.redis.load(ACK)
        await self.redis.load(REPLY_ACK)
        await self.redis.load(SEQ_REPLY_ACK)

    async def load_reply_ack_script(self) -> None:
        """Load REPLY_ACK's scripts again (Redis lost its scripts: a restart)."""
        await self.redis.load(REPLY_ACK)
        await self.redis.load(SEQ_REPLY_ACK)

    async def extend(self, keys: ModelKeys, token: int, job_ids: list[str], lease_ms: int) -> int:
        """Renew the lease ``token`` on these jobs; 0 if it was reclaimed meanwhile."""
        if not job_ids:
            return 0
        return int(
            await self.redis.script(EXTEND, keys=[keys.inflight], args=[keys.job_prefix, token, lease_ms, *job_ids])
        )

    async def release(self, keys: ModelKeys, token: int, job_ids: list[str]) -> int:
        """Put jobs taken under ``token`` but never run back in their place."""
        if not job_ids:
            return 0
        return int(
            await self.redis.script(
                RELEASE,
                keys=[keys.ready, keys.inflight, keys.wake, keys.queued],
                args=[keys.job_prefix, token, *job_ids],
            )
        )

    async def withdraw(self, keys: ModelKeys, job_id: str) -> bool:
        """Remove a job no one holds yet; False if a worker already leased it."""
        return bool(await self.redis.script(WITHDRAW, keys=[keys.ready, keys.job(job_id), keys.queued], args=[job_id]))

    async def rewake(self, keys: ModelKeys) -> bool:
        """Give back a wake token taken for a model this worker dropped; False: not needed."""
        return bool(await self.redis.script(REWAKE, keys=[keys.wake, keys.ready]))

    async def reap(self, keys: ModelKeys, *, max_attempts: int, limit: int = 256) -> Reaped:
        """Redeliver the jobs of expired leases; hand back those out of attempts."""
        requeued, flat = await self.redis.script(
            REAP,
            keys=[keys.ready, keys.inflight, keys.wake, keys.queued, keys.sched, keys.drain],
            args=[keys.job_prefix, max_attempts, limit, DRAIN_FRESH_MS],
        )
        dead = [(_text(flat[i]), _text(flat[i + 1]), int(flat[i + 2])) for i in range(0, len(flat), 3)]
        return Reaped(int(requeued), dead)

    async def held(self, jobs: Sequence[tuple[ModelKeys, str]]) -> list[bool]:
        """Whether Redis still holds each job (keys, job id), in one round trip.

        A worker writes a job's reply before its ack deletes the job, so a job
        that is gone was either answered or lost. Raises the first error reply
        (e.g. a Redis still loading its data)."""
        if not jobs:
            return []
        found = await self.redis.pipeline([("EXISTS", keys.job(job_id)) for keys, job_id in jobs])
        if failed := next((r for r in found if isinstance(r, RedisError)), None):
            raise failed
        return [bool(exists) for exists in found]

    async def wake_worker(self, worker_id: str) -> None:
        """Push a token to the worker's own wake list: its wait ends and starts again."""
        await self.redis.execute("RPUSH", worker_wake_key(worker_id), 1)

    async def forget_worker(self, worker_id: str) -> None:
        """Delete the worker's own wake list (it is closing)."""
        await self.redis.execute("DEL", worker_wake_key(worker_id))


def _claim_keys_args(keys: ModelKeys, **options: Unpack[ClaimOptions]) -> tuple[list[Any], list[Any]]:
    """CLAIM's keys and arguments; :func:`parse_claim` reads its reply."""
    max_items = options["max_items"]
    ms_per_job = options.get("ms_per_job", 0.0)
    scan = options.get("scan_limit") or max(4 * max_items, 16)
    return (
        [keys.ready, keys.inflight, keys.wake, keys.fence, keys.sched, keys.queued, keys.drain],
        [
            keys.job_prefix,
            max_items,
            options["lease_ms"],
            options["worker_id"],
            scan,
            options.get("signature", ""),
            options.get("lower_share_every", 0),
            options.get("batch_ms", 0),
            f"{ms_per_job:.4f}" if ms_per_job > 0 else 0,
            options.get("sequence_prefix", ""),
            options.get("sequence_idle_ms", 0),
        ],
    )


def claim_command(keys: ModelKeys, **options: Unpack[ClaimOptions]) -> Command:
    """CLAIM as one command for a pipeline (e.g. behind a blocking wait, so a
    wake-up and its claim cost one round trip); :func:`parse_claim` reads its reply."""
    return CLAIM.call(*_claim_keys_args(keys, **options))


def parse_claim(raw: list[Any]) -> ClaimedBatch:
    """A CLAIM reply as a :class:`ClaimedBatch`."""
    token, now_ms, flat_jobs, flat_expired, flat_steps = raw
    jobs = [(_text(flat_jobs[i]), bytes(flat_jobs[i + 1])) for i in range(0, len(flat_jobs), 2)]
    expired = [(_text(flat_expired[i]), _text(flat_expired[i + 1])) for i in range(0, len(flat_expired), 2)]
    steps = {
        _text(flat_steps[i]): ClaimedStep(
            _text(flat_steps[i + 1]),
            _text(flat_steps[i + 2]),
            None if flat_steps[i + 3] is None else bytes(flat_steps[i + 3]),
        )
        for i in range(0, len(flat_steps), 4)
    }
    return ClaimedBatch(int(token), int(now_ms), jobs, expired, steps)


def _ack_keys_args(keys: ModelKeys, token: int, job_ids: list[str]) -> tuple[list[Any], list[Any]]:
    """ACK's keys and arguments."""
    return [keys.inflight, keys.ready, keys.sched, keys.drain], [keys.job_prefix, token, *job_ids]


def ack_command(keys: ModelKeys, token: int, job_ids: list[str]) -> Command:
    """ACK as one command for a pipeline, by SHA alone: its reply there is a
    ``NoScriptError`` if Redis lost its script cache (a restart); the caller then
    acks with :meth:`QueueProtocol.ack`, which loads the script."""
    return ACK.call(*_ack_keys_args(keys, token, job_ids))


def reply_ack_command(
    keys: ModelKeys, reply_to: str, replies: Sequence[bytes | Chunks], acks: Sequence[tuple[int, str]]
) -> Command:
    """REPLY_ACK as one command for a pipeline: push ``replies`` to the gateway list
    ``reply_to`` and ack ``acks`` (lease token, job id) in one atomic script, the push
    first (a refused write writes and acks nothing). Its reply is how many jobs were
    acked, or a ``NoScriptError`` after a Redis restart (load it with
    :meth:`QueueProtocol.load_reply_ack_script` and send again)."""
    flat_acks = [part for token, job_id in acks for part in (token, job_id)]
    return REPLY_ACK.call(
        [reply_to, keys.inflight],
        [keys.job_prefix, REPLY_TTL_S, len(replies), *replies, *flat_acks],
    )


def reply_ack_commands(
    keys: ModelKeys, reply_to: str, replies: Sequence[bytes | Chunks], acks: Sequence[tuple[int, str]]
) -> list[Command]:
    """:func:`reply_ack_command`, with replies over ``LUA_PAYLOAD_BYTES`` kept out of
    Lua: then a transaction (MULTI, RPUSH of the large replies, EXPIRE, the script
    with the rest and the acks, EXEC), still atomic and in the same round trip. Lua
    would copy each large reply into its heap and out again (a 16 MiB reply took
    Redis about 95 ms that way, 20 ms beside it). A refused write (``maxmemory``)
    is refused when queued, so EXEC runs nothing: a reply is still never acked
    unwritten. The script goes by its body (EVAL), so no NOSCRIPT can fail it
    after the push. Read the replies with :func:`reply_ack_result`."""
    large = [reply for reply in replies if _nbytes(reply) > LUA_PAYLOAD_BYTES]
    if not large:
        return [reply_ack_command(keys, reply_to, replies, acks)]
    small = [reply for reply in replies if _nbytes(reply) <= LUA_PAYLOAD_BYTES]
    _, _, *script = reply_ack_command(keys, reply_to, small, acks)  # without EVALSHA and its SHA
    return [
        ("MULTI",),
        ("RPUSH", reply_to, *large),
        ("EXPIRE", reply_to, REPLY_TTL_S),
        ("EVAL", REPLY_ACK.body, *script),
        ("EXEC",),
    ]


def reply_ack_result(replies: Sequence[Any]) -> Any:
    """REPLY_ACK's result from the replies to :func:`reply_ack_commands`' commands:
    how many jobs were acked, or the first error (a ``RedisError`` value)."""
    if len(replies) == 1:
        return replies[0]
    if failed := next((reply for reply in replies if isinstance(reply, RedisError)), None):
        return failed  # a command refused when queued; EXEC then answers EXECABORT
    executed = replies[-1]
    if executed is None:
        return ResponseError("reply transaction aborted")
    if error := next((reply for reply in executed if isinstance(reply, hiredis.ReplyError)), None):
        return as_redis_error(error)
    return executed[-1]


def _nbytes(reply: bytes | Chunks) -> int:
    return reply.nbytes if isinstance(reply, Chunks) else len(reply)


def wait_command(wake_keys: Iterable[str], timeout_s: float) -> Command:
    """Block until one of the wake lists holds a token, and take it (BLPOP), or
    ``timeout_s`` passes. For a blocking link; :func:`woken_key` reads the reply."""
    return ("BLPOP", *wake_keys, timeout_s)


def woken_key(popped: Any) -> str | None:
    """The wake list a :func:`wait_command` took its token from; None after a timeout."""
    return _text(popped[0]) if popped else None


def _text(value: bytes | str) -> str:
    """A Redis reply's string (hiredis returns bytes)."""
    return value.decode() if isinstance(value, bytes) else value
