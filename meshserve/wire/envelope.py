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

Laid-out replies. A gateway may ask (``QueuedRequest.reply_layout``) for a successful
reply laid out as the bytes it will answer its client with: ``0x01``, the reply's
length (4 bytes, little-endian), the reply (its outputs' ``data_bytes`` set), then the
client's serialized ModelInferResponse (or ModelStreamInferResponse): the gateway's
``response_head`` (model name, the request's id, parameters, encoded by the gateway),
then the version, the outputs and their raw contents from the outputs' own buffers
(:func:`lay_out`, :func:`meshserve.wire.codec.response_parts`). The gateway's reply
link receives that response straight into a ``bytes`` object
(:class:`meshserve.store.resp.HeadedBulk`), which goes to gRPC as it is: no join,
no second buffer. The reply names the layout it used (``InferReply.layout``); an
older worker ignores the request's fields and answers framed, which the gateway
reads as before, so gateways and workers upgrade in either order.
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
from meshserve.store.resp import HEAD_PREFIX, HEADED_MARKER, HeadedBulk
from meshserve.wire.codec import batch_items, output_views, response_parts, shape_signature
from protos import meshserve_pb2 as mpb

_FRAME_HEAD = struct.Struct("<BI")  # 0x00, the message's length in bytes
_LAID_OUT = bytes([HEADED_MARKER])  # a laid-out reply's first byte (then its head's length, as a frame's)

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
    older peer's plain message, with the bytes in each tensor's ``data``).
    ``response``: a laid-out reply's response (the layout is ``message.layout``),
    which ``data`` are views of: the ``bytes`` it was received into, or a view of the
    buffer it came in with its head; None for any other reply."""

    message: Any  # mpb.QueuedRequest or mpb.InferReply
    data: list[memoryview]
    framed: bool
    response: bytes | memoryview | None = None


@dataclass(frozen=True, slots=True)
class ReplyAs:
    """How a gateway asks for its reply: ``layout`` (``mpb.ReplyLayout``), and the
    response's first fields, encoded (:func:`meshserve.wire.codec.response_head`)."""

    layout: int
    head: bytes


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


def lay_out(reply: mpb.InferReply, data: Sequence[Any], request: mpb.QueuedRequest) -> bytes | Chunks:
    """A successful reply laid out as ``request`` asks (see the module docstring), its
    outputs' bytes (``data``, in output order) written from their own buffers; the
    reply's ``layout`` is set to say so."""
    reply.layout = request.reply_layout
    streamed = request.reply_layout == mpb.REPLY_STREAM_RESPONSE
    head = reply.SerializeToString()
    parts: list[Any] = [HEAD_PREFIX.pack(HEADED_MARKER, len(head)), head]
    parts += response_parts(reply, data, request.response_head, streamed=streamed)
    if sum(len(part) for part in parts) < INLINE_FRAME_BYTES:
        return b"".join(parts)
    return Chunks.of(parts)


def laid_out(request: mpb.QueuedRequest) -> bool:
    """Whether a worker answers ``request`` with a laid-out reply (:func:`lay_out`):
    the layouts this version knows; framed for any other."""
    return request.reply_layout in (mpb.REPLY_INFER_RESPONSE, mpb.REPLY_STREAM_RESPONSE)


def unframe(payload: bytes | memoryview | HeadedBulk, kind: type[M]) -> Unframed:
    """Read a payload :func:`frame` or :func:`lay_out` wrote, or a plain message of ``kind``.

    The views keep ``payload`` alive; nothing is copied (a laid-out reply that came in
    one buffer with its head, a small one or one read by a link that does not split
    heads, has its response as a view of that buffer: the gateway copies it into the
    ``bytes`` gRPC sends, on a thread when large). Raises
    ``google.protobuf.message.DecodeError`` (or ValueError) on a payload that is neither."""
    if isinstance(payload, HeadedBulk):
        return _laid_out(kind.FromString(payload.head), payload.body)
    if payload[:1] == _LAID_OUT:
        _, length = HEAD_PREFIX.unpack_from(payload)
        view = memoryview(payload)
        if HEAD_PREFIX.size + length > len(view):
            raise ValueError("laid-out reply is cut short inside its head")
        message = kind.FromString(view[HEAD_PREFIX.size : HEAD_PREFIX.size + length])  # type: ignore[arg-type]
        return _laid_out(message, view[HEAD_PREFIX.size + length :])
    if payload[:1] != b"\x00":
        return Unframed(kind.FromString(payload), [], framed=False)  # type: ignore[arg-type]  # takes any buffer
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


def _laid_out(message: Any, response: bytes | memoryview) -> Unframed:
    if not isinstance(message, mpb.InferReply):
        raise ValueError("only a reply is laid out as a response")
    return Unframed(message, output_views(response, message.outputs), framed=True, response=response)


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
