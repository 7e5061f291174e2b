"""A ModelInferRequest's ``raw_input_contents``, read in place from the bytes gRPC received.

Parsed by protobuf, a request's tensor bytes are copied into the message, and copied
again each time the field is read (upb hands out new ``bytes``): two copies of the
payload before the gateway has done anything. :func:`parse_infer_request` walks the
message's top-level fields instead (a handful: names, shapes and parameters sit inside
them), keeps each ``raw_input_contents`` entry as a view of the received bytes, and
lets protobuf parse the rest, which is small. The views keep the received bytes alive.
"""

from __future__ import annotations

from dataclasses import dataclass

from protos import grpc_service_pb2 as pb

RAW_INPUT_CONTENTS = 7
"""The field number of ``ModelInferRequest.raw_input_contents`` (protos/grpc_service.proto)."""

IN_PLACE_BYTES = 64 * 1024
"""Requests of at least this many bytes have their raw contents read in place."""

_LENGTH_DELIMITED = 2


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """A ModelInfer request as received: the message without its raw contents, and
    those as views of the received bytes, in order."""

    message: pb.ModelInferRequest
    raw: list[memoryview] | None  # None: left in ``message`` (a small request)


def parse_infer_request(data: bytes) -> ReceivedRequest:
    """Parse a serialized ModelInferRequest, its raw contents left in place.

    Raises ``google.protobuf.message.DecodeError`` for bytes that are not a message,
    as protobuf's own parse does (a walk that fails is handed to it to say why). A
    small request is parsed by protobuf alone: its copies cost less than the walk."""
    if len(data) < IN_PLACE_BYTES:
        return ReceivedRequest(pb.ModelInferRequest.FromString(data), None)
    try:
        rest, raw = _split_raw(data)
    except (IndexError, ValueError):
        return ReceivedRequest(pb.ModelInferRequest.FromString(data), None)  # raises DecodeError
    return ReceivedRequest(pb.ModelInferRequest.FromString(rest), raw)


def _split_raw(data: bytes) -> tuple[bytes, list[memoryview]]:
    """The encoding without field 7, and field 7's values as views of ``data``."""
    view = memoryview(data)
    raw: list[memoryview] = []
    kept: list[memoryview] = []
    position, kept_from, end = 0, 0, len(data)
    while position < end:
        tag, start = _varint(data, position)
        wire_type = tag & 7
        if wire_type == _LENGTH_DELIMITED:
            length, start = _varint(data, start)
            following = start + length
        elif wire_type == 0:
            _, following = _varint(data, start)
        elif wire_type in (1, 5):
            following = start + (8 if wire_type == 1 else 4)
        else:
            raise ValueError(f"wire type {wire_type} at byte {position}")
        if following > end:
            raise ValueError(f"field runs past the end at byte {position}")
        if tag >> 3 == RAW_INPUT_CONTENTS and wire_type == _LENGTH_DELIMITED:
            kept.append(view[kept_from:position])
            raw.append(view[start:following])
            kept_from = following
        position = following
    if not raw:
        return data, raw
    kept.append(view[kept_from:end])
    return b"".join(kept), raw


def _varint(data: bytes, position: int) -> tuple[int, int]:
    """The varint at ``position`` and the position after it; IndexError past the end."""
    value, shift = 0, 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")
