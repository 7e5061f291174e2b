"""Batches as data: decode claimed jobs, stack their inputs into one feed, and cut
the outputs back into one reply per request. Pure functions, no I/O."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from meshserve.models.repository import ModelInfo
from meshserve.queue import ClaimedBatch
from meshserve.wire.codec import from_array, to_array
from meshserve.wire.envelope import envelope_items
from model_workers.served import Served
from protos import meshserve_pb2 as mpb


@dataclass(slots=True)
class Job:
    job_id: str
    token: int
    request: mpb.QueuedRequest
    batch_size: int


def decode(claim: ClaimedBatch, model: ModelInfo) -> list[Job]:
    jobs = []
    for job_id, payload in claim.jobs:
        request = mpb.QueuedRequest.FromString(payload)
        jobs.append(Job(job_id, claim.token, request, envelope_items(request, model)))
    return jobs


def by_token(jobs: list[Job]) -> dict[int, list[str]]:
    """Job ids grouped by the lease (fencing token) they were claimed under."""
    groups: dict[int, list[str]] = defaultdict(list)
    for job in jobs:
        groups[job.token].append(job.job_id)
    return groups


def stack(jobs: list[Job]) -> dict[str, np.ndarray[Any, Any]]:
    """One feed for the batch: inputs concatenated along dim 0 (a view for one job)."""
    if len(jobs) == 1:
        return {t.name: to_array(t) for t in jobs[0].request.inputs}
    names = [t.name for t in jobs[0].request.inputs]
    return {name: np.concatenate([to_array(job.request.inputs[i]) for job in jobs]) for i, name in enumerate(names)}


def split(
    served: Served,
    jobs: list[Job],
    outputs: list[np.ndarray[Any, Any]],
    compute_us: int,
    claimed_ns: int,
    worker_id: str,
) -> list[tuple[Job, mpb.InferReply]]:
    """Cut batch outputs back into one reply per request (views, one copy into bytes)."""
    info = served.model.info
    specs = info.outputs
    replies = []
    start = 0
    for job in jobs:
        end = start + job.batch_size
        wanted = set(job.request.outputs)
        reply = mpb.InferReply(
            id=job.job_id,
            model=info.name,
            version=info.version,
            compute_us=compute_us,
            queue_wait_us=max(0, claimed_ns // 1000 - job.request.enqueued_ms * 1000),
            worker_id=worker_id,
        )
        for spec, out in zip(specs, outputs, strict=True):
            if wanted and spec.name not in wanted:
                continue
            part = out[start:end] if info.max_batch_size else out
            reply.outputs.append(from_array(spec.name, spec.datatype, part))
        replies.append((job, reply))
        start = end
    return replies
