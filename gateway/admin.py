"""The gateway's Admin service (protos/meshserve.proto): traffic splits, for admins.

``meshserve models split`` and any stub generated from our proto call it on the
gateway's public port, with the tenant's key: the gateway authenticates the tenant
(the servicer), lets only a tenant marked ``admin: true`` through (in open
development mode, everyone), forwards the split to the router and answers once its
own routing table carries the new generation, so the next call here follows it.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from gateway.repository import TABLE_WAIT_S, check_admin, router_error
from gateway.servicer import Context, InferenceServicer
from meshserve.errors import MeshError
from protos import meshserve_pb2 as mpb
from protos import meshserve_pb2_grpc as mpb_grpc

log = logging.getLogger(__name__)


class AdminServicer(mpb_grpc.AdminServicer):
    def __init__(self, inference: InferenceServicer) -> None:
        self.inference = inference
        self.routing = inference.gateway.routing

    async def SetTrafficSplit(self, request: mpb.TrafficSplit, context: Context) -> mpb.TrafficSplit:  # noqa: N802
        try:
            check_admin(self.inference.authenticate(context), "change the traffic split of", request.model)
            before = self.routing.view.generation
            try:
                answer: mpb.TrafficSplit = await self.routing.router.SetTrafficSplit(
                    request, timeout=context.time_remaining()
                )
            except grpc.aio.AioRpcError as exc:
                raise router_error(exc) from None
        except MeshError as error:
            await context.abort(error.code, error.message)
        try:  # the router published the split in a new generation: wait for it here
            async with asyncio.timeout(TABLE_WAIT_S):
                await self.routing.wait_for(lambda view: view.generation > before)
        except TimeoutError:  # the split is in force at the router; this gateway's copy is late
            log.warning(
                "the routing table with model %r's new split not received within %.0f s", request.model, TABLE_WAIT_S
            )
        return answer
