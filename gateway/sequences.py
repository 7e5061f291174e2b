"""The gateway's side of sequences: read a step's parameters, admit it in Redis.

tritonclient sends ``sequence_id`` (int64 or string), ``sequence_start`` and
``sequence_end`` as request parameters. A model without ``sequence:`` refuses
them (INVALID_ARGUMENT) rather than ignore them: a client that believes it keeps
state must hear that it does not. A stateful model needs an id on every request.
Admission is one script (:class:`meshserve.queue.sequences.SequenceProtocol`):
the sequence must be live unless the step starts it, and a start counts against
the caps. Ordering: the claim takes one step of a sequence at a time, in queue
order, whichever gateway queued it; for queue order to be arrival order, every step
queues at the tier of its sequence's start step (kept with the sequence's state), so
a later step sent at a higher priority cannot overtake an earlier one.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.exceptions import RedisError

from meshserve.errors import InvalidArgument, ResourceExhausted, Unavailable
from meshserve.models.repository import ModelInfo
from meshserve.queue.keys import SequenceKeys, sequence_member
from meshserve.queue.sequences import Admitted, SequenceProtocol, not_live_message, step_flags
from meshserve.store.link import RedisLink
from protos import grpc_service_pb2 as pb

SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")


@dataclass(frozen=True, slots=True)
class Step:
    """One request's place in its sequence: the id as Redis names it (``i<int>`` or
    ``s<string>``: 5 and "5" are different sequences, as in Triton) and its flags."""

    sequence_id: str
    start: bool
    end: bool

    @property
    def flags(self) -> str:
        return step_flags(start=self.start, end=self.end)


def step_of(message: pb.ModelInferRequest, model: ModelInfo) -> Step | None:
    """The request's step for a stateful model; None for a stateless model's request.
    Raises InvalidArgument for sequence parameters sent to a stateless model, or a
    stateful model's request without a sequence id."""
    params = message.parameters
    if model.sequence is None:
        sent = [name for name in SEQUENCE_PARAMETERS if name in params and _set(params[name])]
        if sent:
            raise InvalidArgument(
                f"model '{model.name}' has no sequence: section in its config.yaml (it keeps no state between"
                f" requests), but the request sets {', '.join(sent)}"
            )
        return None
    sequence_id = _sequence_id(params.get("sequence_id"))
    if sequence_id is None:
        raise InvalidArgument(
            f"model '{model.name}' is a sequence model: every request needs a non-zero 'sequence_id'"
            " (tritonclient's sequence_id), with sequence_start on the first"
        )
    start = "sequence_start" in params and params["sequence_start"].bool_param
    end = "sequence_end" in params and params["sequence_end"].bool_param
    return Step(sequence_id, start, end)


class Sequences:
    """Admits steps; owns nothing but its script calls."""

    def __init__(self, redis: RedisLink) -> None:
        self.protocol = SequenceProtocol(redis)

    async def admit(self, model: ModelInfo, tenant: str, step: Step, items: int, tier: int) -> tuple[str, int]:
        """Admit ``step`` of the tenant's sequence, ``items`` its batch size, asking queue
        tier ``tier``; returns its member and the tier it queues at (the start step's).
        Raises InvalidArgument (not live, or more than one item), ResourceExhausted (a
        cap) or Unavailable."""
        config = model.sequence
        assert config is not None
        if items != 1:
            raise InvalidArgument(
                f"model '{model.name}' is a sequence model: a step is one item (dim 0 of 1), got {items}"
            )
        member = sequence_member(tenant, step.sequence_id)
        try:
            admitted = await self.protocol.admit(
                SequenceKeys.for_model(model.name, model.version),
                member,
                tenant,
                start=step.start,
                idle_timeout_ms=config.idle_timeout_ms,
                max_sequences=config.max_sequences,
                max_sequences_per_tenant=config.max_sequences_per_tenant,
                tier=tier,
            )
        except RedisError as exc:
            raise Unavailable(f"sequence store unavailable: {exc}") from exc
        if admitted.code == Admitted.NOT_LIVE:
            raise InvalidArgument(not_live_message(model.name, step.sequence_id, config.idle_timeout_s))
        if admitted.code == Admitted.MODEL_CAP:
            raise ResourceExhausted(
                f"model '{model.name}' has {config.max_sequences} live sequences (sequence.max_sequences);"
                " end one or wait for one to pass its idle timeout",
                reason="max_sequences",
            )
        if admitted.code == Admitted.TENANT_CAP:
            raise ResourceExhausted(
                f"tenant '{tenant}' has {config.max_sequences_per_tenant} live sequences of model '{model.name}'"
                " (sequence.max_sequences_per_tenant)",
                reason="max_sequences_per_tenant",
            )
        return member, admitted.tier


def _set(param: pb.InferParameter) -> bool:
    """Whether a parameter says anything (tritonclient sends sequence_start=False
    with sequence_id 0: not a sequence request)."""
    which = param.WhichOneof("parameter_choice")
    return which is not None and bool(getattr(param, which))


def _sequence_id(param: pb.InferParameter | None) -> str | None:
    if param is None:
        return None
    which = param.WhichOneof("parameter_choice")
    if which == "string_param":
        return "s" + param.string_param if param.string_param else None
    if which in ("int64_param", "uint64_param"):
        value = int(getattr(param, which))
        return f"i{value}" if value != 0 else None
    return None
