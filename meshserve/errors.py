"""The one error tree of meshserve.

Every error the mesh raises on purpose is a :class:`MeshError` that carries the
gRPC status it maps to; adapters turn it into a status in one place
(``gateway.servicer``), and a worker's reply carries it across Redis
(``meshserve.wire.envelope``: ``failed_reply`` and ``reply_error``). Messages name the field or the model at fault, e.g.
``input 'x': expected FP32, got FP64``. Anything that is not a MeshError is a
bug: it is logged once with its traceback and answered INTERNAL.

    MeshError
    ├── InvalidArgument     (INVALID_ARGUMENT)  malformed or mismatched tensors
    ├── Unauthenticated     (UNAUTHENTICATED)   no valid API key or tenant certificate
    ├── PermissionDenied    (PERMISSION_DENIED) a model the tenant may not use, existing or not
    ├── NotFound            (NOT_FOUND)         unknown model or version
    ├── ResourceExhausted   (RESOURCE_EXHAUSTED) too large, queue full, over a limit
    ├── DeadlineExceeded    (DEADLINE_EXCEEDED) the request's deadline passed
    ├── Unavailable         (UNAVAILABLE)       model not ready, dependency down, draining
    └── Internal            (INTERNAL)          a model failed while computing
"""

from __future__ import annotations

import grpc


class MeshError(Exception):
    """Base of every deliberate error; ``code`` is the gRPC status it maps to."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(MeshError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(MeshError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(MeshError):
    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(MeshError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(MeshError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, reason: str = "exhausted", retry_after_ms: int = 0) -> None:
        super().__init__(message)
        self.reason = reason  # the rejections metric's label: rate, inflight, tenant_queue_full, ...
        self.retry_after_ms = retry_after_ms  # sent as the `retry-after-ms` trailer when > 0


class DeadlineExceeded(MeshError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(MeshError):
    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str, *, retry_after_ms: int = 0) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms  # sent as the `retry-after-ms` trailer when > 0 (a model loading)


class Internal(MeshError):
    code = grpc.StatusCode.INTERNAL


_BY_STATUS: dict[grpc.StatusCode, type[MeshError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        Unauthenticated,
        PermissionDenied,
        NotFound,
        ResourceExhausted,
        DeadlineExceeded,
        Unavailable,
        Internal,
    )
}


def error_for_status(status: grpc.StatusCode, message: str) -> MeshError:
    """The error of the tree that carries ``status``; Internal for a status no
    error of the mesh carries (it was not raised on purpose)."""
    return _BY_STATUS.get(status, Internal)(message)
