"""The Triton repository RPCs at the gateway: rights here, the work at the router.

The gateway authenticates the tenant (the servicer), checks its rights, and forwards
the call over its router channel (the stub :class:`gateway.routing.RoutingWatch`
watches the table with). Load and Unload change what every tenant is served: only a
tenant marked ``admin: true`` in the tenants file may call them (in open development
mode, everyone); others get PERMISSION_DENIED. RepositoryIndex shows a tenant only
the models its patterns allow. The router's status comes back as it was given.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc

from gateway.routing import RoutingWatch
from meshserve.errors import MeshError, PermissionDenied, Unavailable, error_for_status
from meshserve.tenancy.tenants import Tenant
from meshserve.wire.routing import GENERATION_TRAILER
from protos import grpc_service_pb2 as pb

log = logging.getLogger(__name__)

TABLE_WAIT_S = 5.0
"""After a load or unload, the longest wait for this gateway's table to show it."""


class RepositoryForwarder:
    """Forwards the repository RPCs to the router; holds no state of its own."""

    def __init__(self, routing: RoutingWatch) -> None:
        self.routing = routing
        self.router = routing.router

    async def index(
        self, request: pb.RepositoryIndexRequest, tenant: Tenant, timeout_s: float | None
    ) -> pb.RepositoryIndexResponse:
        """The router's index, less the models ``tenant`` may not use."""
        try:
            answer: pb.RepositoryIndexResponse = await self.router.RepositoryIndex(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise router_error(exc) from None
        return pb.RepositoryIndexResponse(models=[m for m in answer.models if tenant.may_use(m.name)])

    async def load(self, request: pb.RepositoryModelLoadRequest, tenant: Tenant, timeout_s: float | None) -> None:
        check_admin(tenant, "load", request.model_name)
        await self._change(self.router.RepositoryModelLoad(request, timeout=timeout_s))

    async def unload(self, request: pb.RepositoryModelUnloadRequest, tenant: Tenant, timeout_s: float | None) -> None:
        check_admin(tenant, "unload", request.model_name)
        await self._change(self.router.RepositoryModelUnload(request, timeout=timeout_s))

    async def _change(self, call: Any) -> None:
        """Await the router's answer, then this gateway's table at its generation."""
        try:
            await call
            trailers = await call.trailing_metadata()
        except grpc.aio.AioRpcError as exc:
            raise router_error(exc) from None
        generation = next((int(v) for k, v in trailers or () if k == GENERATION_TRAILER), None)
        if generation is None:
            return
        try:
            async with asyncio.timeout(TABLE_WAIT_S):
                await self.routing.wait_for(lambda view: view.generation >= generation)
        except TimeoutError:  # the change is made; this gateway's copy is late, and will follow
            log.warning("routing table generation %d not received within %.0f s", generation, TABLE_WAIT_S)


def check_admin(tenant: Tenant, what: str, model: str) -> None:
    if not tenant.admin:
        raise PermissionDenied(
            f"tenant '{tenant.name}' may not {what} model '{model}': only a tenant with 'admin: true' may"
        )


def router_error(exc: grpc.aio.AioRpcError) -> MeshError:
    """The router's answer as ours; a router away is UNAVAILABLE, saying so."""
    code = exc.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and not exc.details():
        return Unavailable(f"the router did not answer ({code.name})")
    return error_for_status(code, exc.details() or code.name)
