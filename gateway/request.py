"""A ModelInfer request as the core takes it: names and parameters read off the
protobuf message once, on the adapter side.

The tensors are not decoded here: that waits until the core has admitted the
call (a refused call must cost as little as possible), so the message travels on
as ``message`` for the codec.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from meshserve.queue import NUM_TIERS
from protos import grpc_service_pb2 as pb


@dataclass(frozen=True, slots=True)
class InferCall:
    """One inference call's request, as plain values."""

    model_name: str
    model_version: str  # "" for the latest version
    request_id: str  # the client's own id, echoed in the response
    tier: int | None  # the queue tier the ``priority`` parameter asks for; None: none asked
    timeout_ms: float | None  # the ``timeout`` parameter; None: none given
    message: pb.ModelInferRequest  # inputs and requested outputs, for the codec
    raw: list[memoryview] | None = None
    """The raw contents, read in place (:mod:`meshserve.wire.rawfields`); None: in
    ``message``. The core empties the list once they are queued, so that the call
    does not keep the received bytes alive while it waits for the reply."""
    metadata: Sequence[tuple[str, Any]] = ()  # the call's gRPC metadata, for a split's sticky_by


def infer_call(
    request: pb.ModelInferRequest, raw: list[memoryview] | None = None, metadata: Sequence[tuple[str, Any]] = ()
) -> InferCall:
    """The request's plain values."""
    return InferCall(
        request.model_name,
        request.model_version,
        request.id,
        requested_tier(request),
        timeout_ms_of(request),
        request,
        raw,
        metadata,
    )


def requested_tier(request: pb.ModelInferRequest) -> int | None:
    """The tier the request's ``priority`` parameter asks for, Triton-style:
    1 is the highest tier, values past the last tier land in the last one;
    None when the request names no priority (absent or 0)."""
    param = request.parameters.get("priority")
    if param is None:
        return None
    value = param.uint64_param or param.int64_param
    if value <= 0:
        return None
    return min(int(value) - 1, NUM_TIERS - 1)


def timeout_ms_of(request: pb.ModelInferRequest) -> float | None:
    """The ``timeout`` parameter (int64 microseconds, as tritonclient sends it), in ms."""
    param = request.parameters.get("timeout")
    if param is None:
        return None
    value = param.int64_param or param.uint64_param
    return value / 1000 if value > 0 else None
