"""Every Redis key of the request path, with its Cluster hash tag.

Keys of one model version share the hash tag ``{m:<model>:<version>}`` (written
``{m:<model>}`` below), so each script's keys live in one Cluster slot:

    ms:{m:<model>}:ready      ZSET  job id -> tier * TIER_SPAN + virtual start (lowest first)
    ms:{m:<model>}:inflight   ZSET  job id -> lease expiry, Redis clock ms
    ms:{m:<model>}:job:<id>   HASH  p=payload d=deadline_ms t=tenant r=reply_to
                                    s=shape signature n=batch items q=ready score a=attempts
                                    k=fencing token of the current lease w=worker
    ms:{m:<model>}:wake       LIST  at most one token: "there may be work" (workers block on it)
    ms:{m:<model>}:sched      HASH  c<tier> = virtual clock of a tier; f<tier>:<tenant> =
                                    the tenant's virtual finish in that tier; turn = claims
    ms:{m:<model>}:queued     HASH  tenant -> its jobs in the ready set (for max_queued)
    ms:{m:<model>}:fence      STR   fencing-token counter for leases
    ms:{m:<model>}:drain      HASH  worker id -> "<ms per job> <when, Redis clock ms>": how
                                    fast each worker has been taking this model's jobs
    ms:{m:<model>}:seq:<member> HASH  a live sequence (meshserve/queue/sequences.py): v=its state
                                    (the state outputs' bytes; '' = the initial values)
                                    b=the job id of its step taken or in flight; expires
                                    after the model's sequence idle timeout
    ms:{m:<model>}:seqlive    ZSET  member -> expiry, Redis clock ms: live sequences, for the cap
    ms:{m:<model>}:seqlive:<tenant> ZSET  the same, one tenant's, for the per-tenant cap
    ms:{g:<gateway>}:replies  LIST  serialized InferReply messages for one gateway
    ms:{w:<worker>}:wake      LIST  a token: "the set of models you serve changed"

Job hashes are addressed inside the scripts from a prefix passed in ARGV. That is
safe on Redis Cluster because the prefix carries the model's hash tag.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ModelKeys:
    """All keys of one model version, with its hash tag."""

    ready: str
    inflight: str
    wake: str
    sched: str
    queued: str
    fence: str
    drain: str
    job_prefix: str

    @staticmethod
    def for_model(model: str, version: int) -> ModelKeys:
        """The keys of one model version (the same object each time: every request
        asks, and eight strings built per request add up)."""
        return _keys_of(model, version)

    @classmethod
    def build(cls, model: str, version: int) -> ModelKeys:
        base = f"ms:{{m:{model}:{version}}}:"
        return cls(
            ready=base + "ready",
            inflight=base + "inflight",
            wake=base + "wake",
            sched=base + "sched",
            queued=base + "queued",
            fence=base + "fence",
            drain=base + "drain",
            job_prefix=base + "job:",
        )

    def job(self, job_id: str) -> str:
        return self.job_prefix + job_id


@functools.lru_cache(maxsize=4096)  # model versions a process serves or routes: a bounded set
def _keys_of(model: str, version: int) -> ModelKeys:
    return ModelKeys.build(model, version)


@dataclass(frozen=True, slots=True)
class SequenceKeys:
    """The keys of one model version's sequences (a stateful model), with its hash tag.

    A sequence's member is ``<len(tenant)>:<tenant>:<sequence id>``: two tenants'
    sequences with the same id never share a key, whatever their names hold."""

    state_prefix: str
    live: str
    tenant_live_prefix: str

    @classmethod
    def for_model(cls, model: str, version: int) -> SequenceKeys:
        return cls.of(ModelKeys.for_model(model, version))

    @classmethod
    def of(cls, keys: ModelKeys) -> SequenceKeys:
        """The sequence keys of the model version whose queue keys are ``keys``."""
        base = keys.job_prefix.removesuffix("job:")
        return cls(state_prefix=base + "seq:", live=base + "seqlive", tenant_live_prefix=base + "seqlive:")

    def state(self, member: str) -> str:
        return self.state_prefix + member

    def tenant_live(self, tenant: str) -> str:
        return self.tenant_live_prefix + tenant


def sequence_member(tenant: str, sequence_id: str) -> str:
    """The tenant's sequence, as its keys and its jobs name it."""
    return f"{len(tenant)}:{tenant}:{sequence_id}"


def member_sequence_id(member: str) -> str:
    """The sequence id of a member (:func:`sequence_member`)."""
    length, rest = member.split(":", 1)
    return rest[int(length) + 1 :]


def reply_key(gateway_id: str) -> str:
    """The gateway's reply list: workers push to it, its one reader pops."""
    return f"ms:{{g:{gateway_id}}}:replies"


def worker_wake_key(worker_id: str) -> str:
    """The worker's own wake list; it deletes it on close."""
    return f"ms:{{w:{worker_id}}}:wake"
