"""Triton's ModelStatistics at the gateway: asked of the router, shown per tenant.

The figures are the workers' (summed by the router, :mod:`router.statistics`); the
gateway adds none of its own: a request it refused before any worker saw it (bad
input, over a limit, unknown key) is not in ``fail``. It asks the router over the
channel of its routing watch, and a tenant sees only the models it may use: naming
another model is PERMISSION_DENIED, as for ModelMetadata, and a request for every
model leaves the others out.
"""

from __future__ import annotations

import grpc

from gateway.core import Gateway
from meshserve.errors import MeshError, Unavailable, error_for_status
from meshserve.tenancy.tenants import Tenant
from protos import grpc_service_pb2 as pb

ROUTER_TIMEOUT_S = 5.0
"""How long the gateway waits for the router's statistics when the call has no
shorter deadline."""


async def model_statistics(
    gateway: Gateway, tenant: Tenant, request: pb.ModelStatisticsRequest, remaining_s: float | None
) -> pb.ModelStatisticsResponse:
    """The statistics ``request`` asks for, of the models ``tenant`` may use; raises
    a MeshError (PERMISSION_DENIED, NOT_FOUND, UNAVAILABLE when the router is away).
    ``remaining_s``: the call's time left (None: no deadline)."""
    if request.name:
        gateway.authorize(tenant, request.name)
    timeout_s = ROUTER_TIMEOUT_S if remaining_s is None else min(ROUTER_TIMEOUT_S, remaining_s)
    try:
        answer: pb.ModelStatisticsResponse = await gateway.routing.router.ModelStatistics(request, timeout=timeout_s)
    except grpc.aio.AioRpcError as exc:
        raise _router_error(exc) from None
    shown = [stats for stats in answer.model_stats if tenant.may_use(stats.name)]
    return pb.ModelStatisticsResponse(model_stats=shown)


def _router_error(exc: grpc.aio.AioRpcError) -> MeshError:
    """The router's answer as the gateway's: its NOT_FOUND as is; anything else
    means the statistics cannot be had now."""
    if exc.code() == grpc.StatusCode.NOT_FOUND:
        return error_for_status(exc.code(), exc.details() or "unknown model")
    return Unavailable(f"model statistics unavailable: the router answered {exc.code().name} ({exc.details()})")
