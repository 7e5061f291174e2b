"""The envelopes that cross Redis between gateway and worker (protos/meshserve.proto).

A reply's status: :func:`failed_reply` puts an error of the one error tree
(:mod:`meshserve.errors`) in a reply, :func:`reply_error` takes it out again; the
reply's ``code`` enum has the numbers of grpc.StatusCode.

A request's batch figures: the gateway's codec computes the batch items and the
shape signature once (:func:`meshserve.wire.codec.pack_inputs`), ENQUEUE charges
the queue and CLAIM matches batches by them, and the envelope carries them to the
worker, which batches by the same figures (:func:`envelope_items`,
:func:`envelope_signature`).

Framing. A request's or a reply's tensor bytes travel beside its protobuf, not
inside it: ``0x00``, the message's length (4 bytes, little-endian), the message
(its tensors with ``data`` empty and ``data_bytes`` set), then each tensor's bytes
in order (:func:`frame`). Nothing re-serializes a tensor: the gateway sends the
buffers it received, the worker views them with ``np.frombuffer`` and sends its
outputs' buffers back, the gateway answers from the reply's. No protobuf message
starts with a zero byte (field number 0 does not exist), so a plain message (an
older gateway's request, with its tensors inside) is read as before
(:func:`unframe`); a worker answers such a request with a plain reply. Upgrade the
workers before the gateways.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from meshserve.errors import MeshError, error_for_status
from meshserve.models.repository import ModelInfo
from meshserve.store.link import Chunks
from meshserve.wire.codec import batch_items, shape_signature
from protos import meshserve_pb2 as mpb

_FRAME_HEAD = struct.Struct("<BI")  # 0x00, the message's length in bytes

INLINE_FRAME_BYTES = 64 * 1024
"""A framed payload under this many bytes is joined into one bytes object (cheaper
to write than a list of buffers); a larger one goes out as :class:`Chunks`."""

OFF_LOOP_BYTES = 1 << 20
"""Tensors of more bytes than this are decoded, stacked, split and encoded on a
thread, not the event loop's (gateway and worker): their copies and checks take
milliseconds, which every other call of the process (and a worker's reports and
lease renewals) would wait behind. Smaller ones stay inline, where a thread hop
would cost more than the work."""

M = TypeVar("M", mpb.QueuedRequest, mpb.InferReply)


@dataclass(frozen=True, slots=True)
class Unframed:
    """A request or reply read off Redis: the message, and its tensors' bytes as
    read-only views of the received payload, in tensor order (``framed`` False: an
    older peer's plain message, with the bytes in each tensor's ``data``)."""

    message: Any  # mpb.QueuedRequest or mpb.InferReply
    data: list[memoryview]
    framed: bool


def frame(message: mpb.QueuedRequest | mpb.InferReply, data: Sequence[Any]) -> bytes | Chunks:
    """The payload of ``message`` whose tensors' bytes (``data``, in tensor order,
    each a contiguous buffer) follow it. Tensors must have ``data_bytes`` set and
    ``data`` empty. No buffer is copied unless the whole is small."""
    head = message.SerializeToString()
    parts: list[Any] = [_FRAME_HEAD.pack(0, len(head)), head, *data]
    nbytes = len(head) + 5 + sum(memoryview(part).nbytes for part in data)
    if nbytes < INLINE_FRAME_BYTES:
        return b"".join(parts)
    return Chunks.of(parts)


def unframe(payload: bytes, kind: type[M]) -> Unframed:
    """Read a payload :func:`frame` wrote, or a plain message of ``kind``.

    The views keep ``payload`` alive; nothing is copied. Raises
    ``google.protobuf.message.DecodeError`` (or ValueError) on a payload that is neither."""
    if payload[:1] != b"\x00":
        return Unframed(kind.FromString(payload), [], framed=False)
    _, length = _FRAME_HEAD.unpack_from(payload)
    view = memoryview(payload)
    offset = _FRAME_HEAD.size + length
    message = kind.FromString(view[_FRAME_HEAD.size : offset])  # type: ignore[arg-type]  # takes any buffer
    data = []
    for tensor in message.inputs if isinstance(message, mpb.QueuedRequest) else message.outputs:
        end = offset + tensor.data_bytes
        if end > len(payload):
            raise ValueError(f"framed payload is cut short inside tensor '{tensor.name}'")
        data.append(view[offset:end])
        offset = end
    return Unframed(message, data, framed=True)


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
