"""Every Redis key of the request path, with its Cluster hash tag.

Keys of one model version share the hash tag ``{m:<model>:<version>}`` (written
``{m:<model>}`` below), so each script's keys live in one Cluster slot:

    ms:{m:<model>}:ready      ZSET  job id -> tier * TIER_SPAN + virtual start (lowest first)
    ms:{m:<model>}:inflight   ZSET  job id -> lease expiry, Redis clock ms
    ms:{m:<model>}:job:<id>   HASH  p=payload d=deadline_ms t=tenant r=reply_to
                                    s=shape signature n=batch items q=ready score a=attempts
                                    k=fencing token of the current lease w=worker
    ms:{m:<model>}:job:<id>:p STR   the job's payload, when the gateway wrote it beside the
                                    hash (QueueProtocol.enqueue): same time to live, deleted
                                    with the hash
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

Queue partitions (config.yaml ``queue_partitions``, docs/deploy.md#queue-partitions):
a model version's queue may be split into P partitions, each a whole set of the
keys above under a hash tag of its own, so that the partitions spread over a
Cluster's shards. Partition 0 keeps the tag ``{m:<model>:<version>}``: with P = 1
the keys are exactly those of before partitions, so a mesh of mixed versions keeps
working through a rolling upgrade. Partition p > 0 is ``{m:<model>:<version>/<p>.<s>}``
(a version is digits, so no other model version's tag ends that way), where ``s``
is the least number that puts the tag's slot in the p-th slot range after partition
0's, of P equal ranges: on a cluster whose masters hold equal slot ranges (what
``redis-cli --cluster create`` makes), P partitions over P masters land one on each,
not where a hash happens to put them (three on three masters: 2 chances in 9).
Sequences live on partition 0 only.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot


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
        """The keys of one model version's partition 0, its only one unless
        partitioned (the same object each time: every request asks, and eight
        strings built per request add up)."""
        return _keys_of(model, version, 0, 1)

    @classmethod
    def build(cls, model: str, version: int, partition: int = 0, partitions: int = 1) -> ModelKeys:
        """The keys of partition ``partition`` of ``partitions`` (module docstring)."""
        if not 0 <= partition < max(1, partitions):
            raise ValueError(f"partition {partition} of model '{model}': must be from 0 to {partitions - 1}")
        base = f"ms:{{{partition_tag(model, version, partition, partitions)}}}:"
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

    def payload(self, job_id: str) -> str:
        """The job's payload key (the scripts name it ``<job key>:p``)."""
        return self.job_prefix + job_id + ":p"


def partition_tag(model: str, version: int, partition: int, partitions: int) -> str:
    """The hash tag of one queue partition (the module docstring says how it is chosen)."""
    base = f"m:{model}:{version}"
    if partition == 0:
        return base
    width = REDIS_CLUSTER_HASH_SLOTS / partitions
    want = (int(key_slot(base.encode()) // width) + partition) % partitions
    for salt in itertools.count():  # about ``partitions`` tries
        tag = f"{base}/{partition}.{salt}"
        if int(key_slot(tag.encode()) // width) == want:
            return tag
    raise AssertionError("unreachable")  # pragma: no cover


@functools.lru_cache(maxsize=4096)  # model versions (and partitions) a process serves or routes: a bounded set
def _keys_of(model: str, version: int, partition: int, partitions: int) -> ModelKeys:
    return ModelKeys.build(model, version, partition, partitions)


def partition_keys(model: str, version: int, partitions: int) -> tuple[ModelKeys, ...]:
    """The keys of every queue partition of a model version, partition 0 first
    (``partitions`` below 1 reads as 1: a spec from a router before partitions)."""
    return _partitions_of(model, version, max(1, partitions))


@functools.lru_cache(maxsize=4096)
def _partitions_of(model: str, version: int, partitions: int) -> tuple[ModelKeys, ...]:
    return tuple(_keys_of(model, version, p, partitions) for p in range(partitions))


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
