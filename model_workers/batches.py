"""Batches as data: decode claimed jobs, stack their inputs into one feed, and cut
the outputs back into one reply per request. Pure functions, no I/O.

No tensor is copied on the way, except where a batch of several jobs is stacked
(``np.concatenate``) and where a model's output is not contiguous: inputs are views
of the claimed payloads, and each reply's outputs are views of the batch's outputs
(:attr:`Job.reply_data`), written to Redis as they are
(:func:`meshserve.wire.envelope.frame`)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from meshserve.errors import Internal, MeshError
from meshserve.models.classification import read_labels, top_classes
from meshserve.models.repository import ModelInfo
from meshserve.queue import ClaimedBatch, ClaimedStep, ModelKeys
from meshserve.store.link import Chunks
from meshserve.wire.codec import from_array, to_array, to_plain_tensor
from meshserve.wire.envelope import envelope_items, frame, laid_out, lay_out, unframe
from model_workers.served import Served
from protos import meshserve_pb2 as mpb


@dataclass(slots=True)
class Job:
    job_id: str
    token: int
    request: mpb.QueuedRequest
    batch_size: int
    data: list[memoryview] = field(default_factory=list)
    """The inputs' bytes, views of the claimed payload; [] for a plain envelope
    (an older gateway's), whose tensors hold their bytes."""
    framed: bool = False  # the gateway frames: answer it with a framed reply
    reply_data: list[Any] = field(default_factory=list)
    """The reply's outputs' bytes (views of the batch's outputs), set by :func:`split`."""
    step: ClaimedStep | None = None  # a stateful model's step: its sequence and state before it
    state_out: bytes | None = None  # its new state, once computed (model_workers/sequences.py)
    keys: ModelKeys | None = None  # the queue partition it was claimed from; None: the model's only one

    def payload_bytes(self) -> int:
        return sum(len(d) for d in self.data)

    def reply_bytes(self) -> int:
        """The outputs' bytes of the reply :func:`split` made (a plain reply's are inside it: 0)."""
        return sum(memoryview(d).nbytes for d in self.reply_data)


def decode(claim: ClaimedBatch, model: ModelInfo, keys: ModelKeys | None = None) -> list[Job]:
    """The jobs of ``claim``, taken from the queue partition ``keys`` (None: the model's only one)."""
    jobs = []
    for job_id, payload in claim.jobs:
        read = unframe(payload, mpb.QueuedRequest)
        request = read.message
        job = Job(job_id, claim.token, request, envelope_items(request, model), read.data, read.framed)
        job.step = claim.steps.get(job_id) if claim.steps else None
        job.keys = keys
        jobs.append(job)
    return jobs


def serialize_reply(job: Job, reply: mpb.InferReply) -> bytes | Chunks:
    """A reply as the job's gateway reads it: laid out as the client's response when
    the gateway asks for that (:func:`meshserve.wire.envelope.lay_out`), else framed
    with its outputs' buffers, or plain for a gateway that sent a plain envelope."""
    if job.framed and reply.code == mpb.OK and laid_out(job.request):
        return lay_out(reply, job.reply_data, job.request)
    if job.framed and reply.outputs:
        return frame(reply, job.reply_data)
    return reply.SerializeToString()


def batch_bytes(jobs: list[Job]) -> int:
    """The inputs' bytes of a batch (plain envelopes count 0: they come from small
    gateways' requests only in a mesh being upgraded)."""
    return sum(job.payload_bytes() for job in jobs)


def by_lease(jobs: list[Job], keys: ModelKeys) -> dict[tuple[ModelKeys, int], list[str]]:
    """Job ids grouped by their queue partition (``keys`` for a job that names none)
    and the lease (fencing token) they were claimed under: each partition counts its
    own tokens, so a token alone does not name a lease."""
    groups: dict[tuple[ModelKeys, int], list[str]] = defaultdict(list)
    for job in jobs:
        groups[(job.keys or keys, job.token)].append(job.job_id)
    return groups


def stack(jobs: list[Job]) -> dict[str, np.ndarray[Any, Any]]:
    """One feed for the batch: inputs concatenated along dim 0 (a view for one job)."""
    if len(jobs) == 1:
        return {t.name: to_array(t, _data(jobs[0], i)) for i, t in enumerate(jobs[0].request.inputs)}
    names = [t.name for t in jobs[0].request.inputs]
    return {
        name: np.concatenate([to_array(job.request.inputs[i], _data(job, i)) for job in jobs])
        for i, name in enumerate(names)
    }


def _data(job: Job, index: int) -> memoryview | None:
    return job.data[index] if job.framed else None


def split(
    served: Served,
    jobs: list[Job],
    outputs: list[np.ndarray[Any, Any]],
    compute_us: int,
    claimed_ns: int,
    worker_id: str,
) -> list[tuple[Job, mpb.InferReply]]:
    """Cut batch outputs back into one reply per request: views of the outputs, in
    each job's ``reply_data`` (a plain envelope's job gets them copied into its reply)."""
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
        job.reply_data = []
        try:
            for spec, out in zip(specs, outputs, strict=True):
                if wanted and spec.name not in wanted:
                    continue
                part = out[start:end] if info.max_batch_size else out
                k = job.request.class_counts.get(spec.name, 0)
                if k:  # Triton's classification extension: the top k, before the reply is laid out
                    tensor, data = from_array(spec.name, "BYTES", classify(info, spec.name, part, k))
                else:
                    tensor, data = from_array(spec.name, spec.datatype, part)
                if job.framed:
                    reply.outputs.append(tensor)
                    job.reply_data.append(data)
                else:
                    reply.outputs.append(to_plain_tensor(tensor, data))
        except MeshError as exc:  # this request's outputs cannot be ranked: its answer, not the batch's
            del reply.outputs[:]
            job.reply_data = []
            reply.code = exc.code.value[0]
            reply.message = str(exc)
        replies.append((job, reply))
        start = end
    return replies


def classify(info: ModelInfo, name: str, part: np.ndarray[Any, Any], k: int) -> np.ndarray[Any, Any]:
    """Output ``name``'s top ``k`` classes (meshserve/models/classification.py), labelled
    from its ``label_filename`` in the model directory (``<model>/<version>/model.*``)."""
    filename = info.tensors.labels_of(name)
    labels: tuple[str, ...] = ()
    if filename:
        path = info.path.parent.parent / filename
        try:
            labels = read_labels(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise Internal(f"output '{name}': its labels file {path} cannot be read: {exc}") from exc
    return top_classes(name, part, k, info.max_batch_size > 0, labels)
