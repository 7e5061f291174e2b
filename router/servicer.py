"""The router's gRPC adapter over :class:`router.core.RouterCore`.

Thin on purpose: it turns worker reports into plain values for the core and the
core's snapshots into routing tables and assignments.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from meshserve.errors import MeshError
from meshserve.wire.routing import spec_from_info, split_from_pb, split_to_pb
from protos import meshserve_pb2 as mpb
from protos import meshserve_pb2_grpc as mpb_grpc
from router.core import RouterCore, TableSnapshot, slot_from_id
from router.placement import Footprint, Slot


class RouterServicer(mpb_grpc.RouterServicer):
    def __init__(self, core: RouterCore, repository: Path, report_interval_ms: int) -> None:
        self.core = core
        self.repository = repository
        self.report_interval_ms = report_interval_ms

    def _table(self, snap: TableSnapshot) -> mpb.RoutingTable:
        return mpb.RoutingTable(
            generation=snap.generation,
            models=[
                spec_from_info(
                    m,
                    ready=(m.name, m.version) in snap.ready,
                    repository=self.repository,
                    load_error=snap.failed.get((m.name, m.version), ""),
                )
                for m in snap.models
            ],
            splits=[split_to_pb(split) for split in snap.splits],
        )

    async def SetTrafficSplit(  # noqa: N802
        self, request: mpb.TrafficSplit, context: grpc.aio.ServicerContext[mpb.TrafficSplit, mpb.TrafficSplit]
    ) -> mpb.TrafficSplit:
        """Override a model's split until the router restarts (no weights: back to config.yaml's)."""
        try:
            return split_to_pb(await self.core.set_split(split_from_pb(request)))
        except MeshError as error:
            await context.abort(error.code, error.message)
            raise

    async def WatchRoutingTable(  # noqa: N802 (gRPC method name)
        self, request: mpb.WatchRequest, context: grpc.aio.ServicerContext[mpb.WatchRequest, mpb.RoutingTable]
    ) -> AsyncIterator[mpb.RoutingTable]:
        async for snap in self.core.watch():
            yield self._table(snap)

    async def ReportWorker(  # noqa: N802
        self, request: mpb.WorkerReport, context: grpc.aio.ServicerContext[mpb.WorkerReport, mpb.WorkerAssignment]
    ) -> mpb.WorkerAssignment:
        ready = {(m.name, m.version) for m in request.models if m.ready}
        loads = {(m.name, m.version): (m.requests_total, m.queue_wait_seconds_total) for m in request.models}
        footprints = {(m.name, m.version): Footprint(m.weights_bytes, m.activation_bytes) for m in request.models}
        failures = {(m.name, m.version): m.load_error for m in request.models if m.load_error and not m.ready}
        models = await self.core.report(
            request.worker_id,
            request.device,
            ready,
            draining=request.draining,
            loads=loads,
            slot=_slot(request),
            footprints=footprints,
            failures=failures,
        )
        snap = self.core.snapshot()
        return mpb.WorkerAssignment(
            models=[
                spec_from_info(m, ready=(m.name, m.version) in snap.ready, repository=self.repository) for m in models
            ],
            report_interval_ms=self.report_interval_ms,
        )


def _slot(request: mpb.WorkerReport) -> Slot:
    """The worker's device; an older worker that does not describe it: guessed from its id."""
    if not request.device_kind:
        return slot_from_id(request.device)
    return Slot(request.device, request.device_kind, request.device_profile, request.device_memory_bytes)
