"""The router's gRPC adapter over :class:`router.core.RouterCore`.

Thin on purpose: it turns worker reports into plain values for the core and the
core's snapshots into routing tables and assignments.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from meshserve.models.repository import ModelInfo
from meshserve.wire.routing import spec_from_info
from protos import meshserve_pb2 as mpb
from protos import meshserve_pb2_grpc as mpb_grpc
from router.core import RouterCore, TableSnapshot, slot_from_id
from router.placement import Footprint, Slot

EVICTED_REPORT_INTERVAL_MS = 200
"""Workers' heartbeat while some model is evicted: a worker learns that a model was
placed on it on demand at its next report, and a request waits for that meanwhile
(a shorter heartbeat costs the router a report, and a placement, per worker each time)."""


class RouterServicer(mpb_grpc.RouterServicer):
    def __init__(self, core: RouterCore, repository: Path, report_interval_ms: int) -> None:
        self.core = core
        self.repository = repository
        self.report_interval_ms = report_interval_ms

    def _table(self, snap: TableSnapshot) -> mpb.RoutingTable:
        return mpb.RoutingTable(
            generation=snap.generation,
            models=[
                _with_residency(
                    spec_from_info(
                        m,
                        ready=(m.name, m.version) in snap.ready,
                        repository=self.repository,
                        load_error=snap.failed.get((m.name, m.version), ""),
                    ),
                    m,
                    snap,
                )
                for m in snap.models
            ],
        )

    async def DemandModel(  # noqa: N802
        self, request: mpb.ModelDemand, context: grpc.aio.ServicerContext[mpb.ModelDemand, mpb.ModelDemandReply]
    ) -> mpb.ModelDemandReply:
        placed, expected_ms, reason = await self.core.demand((request.model, request.version))
        return mpb.ModelDemandReply(placed=placed, expected_ms=expected_ms, reason=reason)

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
        load_ms = {(m.name, m.version): m.load_ms for m in request.models if m.load_ms}
        models = await self.core.report(
            request.worker_id,
            request.device,
            ready,
            draining=request.draining,
            loads=loads,
            slot=_slot(request),
            footprints=footprints,
            failures=failures,
            load_ms=load_ms,
        )
        snap = self.core.snapshot()
        interval_ms = self.report_interval_ms
        if snap.evicted:  # a model placed on demand is loaded at the worker's next report: soon
            interval_ms = min(interval_ms, EVICTED_REPORT_INTERVAL_MS)
        return mpb.WorkerAssignment(
            models=[
                spec_from_info(m, ready=(m.name, m.version) in snap.ready, repository=self.repository) for m in models
            ],
            report_interval_ms=interval_ms,
        )


def _with_residency(spec: mpb.ModelSpec, info: ModelInfo, snap: TableSnapshot) -> mpb.ModelSpec:
    """``spec`` with what residency says: pinned, evicted (loads on demand: LOADING
    while placed, else UNAVAILABLE) and the measured load time."""
    key = (info.name, info.version)
    spec.pinned = info.pinned
    spec.load_ms = snap.load_ms.get(key, 0)
    if key in snap.evicted and key not in snap.ready:
        spec.evicted = True
        spec.state = "LOADING" if key in snap.loading else "UNAVAILABLE"
    return spec


def _slot(request: mpb.WorkerReport) -> Slot:
    """The worker's device; an older worker that does not describe it: guessed from its id."""
    if not request.device_kind:
        return slot_from_id(request.device)
    return Slot(request.device, request.device_kind, request.device_profile, request.device_memory_bytes)
