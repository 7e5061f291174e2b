"""The envelopes that cross Redis between gateway and worker (protos/meshserve.proto).

A reply's status: :func:`failed_reply` puts an error of the one error tree
(:mod:`meshserve.errors`) in a reply, :func:`reply_error` takes it out again; the
reply's ``code`` enum has the numbers of grpc.StatusCode.

A request's batch figures: the gateway's codec computes the batch items and the
shape signature once (:func:`meshserve.wire.codec.pack_inputs`), ENQUEUE charges
the queue and CLAIM matches batches by them, and the envelope carries them to the
worker, which batches by the same figures (:func:`envelope_items`,
:func:`envelope_signature`).
"""

from __future__ import annotations

import grpc

from meshserve.errors import MeshError, error_for_status
from meshserve.models.repository import ModelInfo
from meshserve.wire.codec import batch_items, shape_signature
from protos import meshserve_pb2 as mpb

_STATUS_BY_NUMBER: dict[int, grpc.StatusCode] = {status.value[0]: status for status in grpc.StatusCode}


def failed_reply(job_id: str, error: MeshError) -> mpb.InferReply:
    """The reply that answers job ``job_id`` with ``error``'s status and message."""
    return mpb.InferReply(id=job_id, code=error.code.name, message=error.message)


def reply_error(reply: mpb.InferReply) -> MeshError | None:
    """The error a reply carries, None for OK. A status the enum does not name
    (a newer peer) reads as UNKNOWN, answered INTERNAL."""
    if reply.code == mpb.OK:
        return None
    return error_for_status(_STATUS_BY_NUMBER.get(reply.code, grpc.StatusCode.UNKNOWN), reply.message)


def envelope_items(request: mpb.QueuedRequest, model: ModelInfo) -> int:
    """The request's batch items, as the gateway charged the queue.

    Every gateway of this version sets ``items`` (at least 1). An envelope without it
    (0) comes from an older gateway in a mesh being upgraded: its count is the
    codec's rule, the one the gateway applied to ENQUEUE."""
    return request.items or batch_items(request.inputs, model)


def envelope_signature(request: mpb.QueuedRequest, model: ModelInfo) -> str:
    """The request's shape signature, byte for byte what CLAIM compares (an older
    gateway's envelope, without ``items``: the codec's rule, as for :func:`envelope_items`)."""
    return request.shape_signature if request.items else shape_signature(request.inputs, model)
