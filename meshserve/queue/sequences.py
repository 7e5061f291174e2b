"""Sequences of a stateful model in Redis: admission of a step, and its reply, ack
and new state written together.

A sequence's state lives in Redis (:class:`meshserve.queue.keys.SequenceKeys`),
keyed by tenant, model, version and sequence id, never in a worker's memory: any
worker runs the next step. The lifecycle of one step:

1. The gateway admits it (``SEQ_ADMIT``, :meth:`SequenceProtocol.admit`): the
   sequence must be live unless the step starts it; a start counts against the
   model's caps. Then it enqueues the step with its member and flags (ENQUEUE's
   ``step``).
2. A claim takes at most one step of a sequence at a time, in queue order, and
   hands it the state it runs against (``CLAIM``, :class:`ClaimedStep`); the
   sequence's field ``b`` names the step whose turn it is.
3. The worker writes the reply, the ack and the new state in one script
   (``SEQ_REPLY_ACK``, :func:`seq_reply_ack_command`) under the step's fencing
   token. A worker that dies mid-step writes nothing: the lease expires, the step is
   redelivered (``b`` still names it, so it keeps the turn) against the state from
   before it. A stale token writes no state: no step is applied twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from meshserve.queue.keys import ModelKeys, SequenceKeys
from meshserve.queue.replies import REPLY_TTL_S
from meshserve.queue.scripts import SEQ_ADMIT, SEQ_REPLY_ACK
from meshserve.store.link import Arg, Chunks, Command, RedisLink

START, END = "s", "e"
"""A step's flags, as the job hash's field ``y`` holds them."""

KEEP_STATE = "k"
WRITE_STATE = "w"
NO_SEQUENCE = "-"


@dataclass(frozen=True, slots=True)
class Admitted:
    """SEQ_ADMIT's answer: ``code`` 1 admitted, -1 the sequence is not live, -2 the
    model's cap of live sequences is reached, -3 the tenant's; ``tier``: the queue tier
    an admitted step takes (its sequence's start step's, so that steps never overtake
    each other by priority)."""

    code: int
    tier: int = 0

    ADMITTED = 1
    NOT_LIVE = -1
    MODEL_CAP = -2
    TENANT_CAP = -3


@dataclass(frozen=True, slots=True)
class StateWrite:
    """What a step's reply does to its sequence: ``op`` ``WRITE_STATE`` (``state``,
    or free the sequence if the step ends it) or ``KEEP_STATE``; the idle timeout
    starts again."""

    op: str
    state: bytes
    idle_timeout_ms: int


@dataclass(frozen=True, slots=True)
class StepWrite:
    """One job's ack in SEQ_REPLY_ACK: its lease token and id, and what happens to its
    sequence: ``WRITE_STATE`` with ``state`` (freed instead if the step ends it),
    ``KEEP_STATE`` (the step failed), ``NO_SEQUENCE`` (a job outside any sequence)."""

    token: int
    job_id: str
    op: str = NO_SEQUENCE
    state: bytes = b""


def shown_sequence_id(sequence_id: str) -> str:
    """A sequence id as the client sent it, for messages: ``i5`` is 5, ``sab`` is 'ab'."""
    return sequence_id[1:] if sequence_id.startswith("i") else repr(sequence_id[1:])


def not_live_message(model: str, sequence_id: str, idle_timeout_s: float) -> str:
    """What a step of a sequence that is not live hears (at the gateway, or at the
    worker when the sequence went while the step was queued)."""
    return (
        f"sequence {shown_sequence_id(sequence_id)} of model '{model}' is not live: it was never started, it"
        f" ended, or it was idle longer than the model's sequence idle timeout (sequence.idle_timeout_s:"
        f" {idle_timeout_s:g} s); send sequence_start to begin it again"
    )


def step_flags(*, start: bool, end: bool) -> str:
    return (START if start else "") + (END if end else "")


class SequenceProtocol:
    """The gateway's call on sequences: one round trip per step of a stateful model."""

    def __init__(self, redis: RedisLink) -> None:
        self.redis = redis

    async def admit(
        self,
        keys: SequenceKeys,
        member: str,
        tenant: str,
        *,
        start: bool,
        idle_timeout_ms: int,
        max_sequences: int,
        max_sequences_per_tenant: int,
        tier: int = 0,
    ) -> Admitted:
        """Admit a step of ``member`` asking queue tier ``tier`` (see :class:`Admitted`);
        renews the idle timeout. A start records its tier for the sequence's later steps."""
        args: list[Arg] = [
            member,
            "1" if start else "0",
            idle_timeout_ms,
            max_sequences,
            max_sequences_per_tenant,
            tier,
        ]
        answer = await self.redis.script(
            SEQ_ADMIT, keys=[keys.state(member), keys.live, keys.tenant_live(tenant)], args=args
        )
        return Admitted(int(answer[0]), int(answer[1]) if len(answer) > 1 else tier)


def seq_reply_ack_command(
    keys: ModelKeys,
    sequences: SequenceKeys,
    idle_timeout_ms: int,
    reply_to: str,
    replies: Sequence[bytes | Chunks],
    acks: Sequence[StepWrite],
) -> Command:
    """SEQ_REPLY_ACK as one command for a pipeline: REPLY_ACK's contract (the push
    first; a refused write writes and acks nothing), with each acked step's new state
    written in the same script. Its reply is how many jobs were acked, or a
    ``NoScriptError`` after a Redis restart."""
    flat: list[Arg] = []
    for ack in acks:
        flat.extend((ack.token, ack.job_id, ack.op, ack.state))
    return SEQ_REPLY_ACK.call(
        [reply_to, keys.inflight, keys.ready, keys.wake, sequences.live],
        [
            keys.job_prefix,
            REPLY_TTL_S,
            sequences.state_prefix,
            sequences.tenant_live_prefix,
            idle_timeout_ms,
            len(replies),
            *replies,
            *flat,
        ],
    )
