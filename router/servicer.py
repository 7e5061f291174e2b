"""The router's gRPC adapter over :class:`router.core.RouterCore`.

Thin on purpose: it turns worker reports into plain values for the core and the
core's snapshots into routing tables and assignments.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc

from meshserve.errors import InvalidArgument, MeshError
from meshserve.models.repository import ModelInfo
from meshserve.wire.routing import (
    GENERATION_TRAILER,
    ensemble_steps_to_pb,
    spec_from_info,
    split_from_pb,
    split_to_pb,
)
from protos import grpc_service_pb2 as pb
from protos import meshserve_pb2 as mpb
from protos import meshserve_pb2_grpc as mpb_grpc
from router.core import RouterCore, TableSnapshot, slot_from_id
from router.lifecycle import RepositoryManager
from router.placement import Footprint, Slot
from router.statistics import StatisticsBook, requested

T = TypeVar("T")
FILE_PREFIX = "file:"

EVICTED_REPORT_INTERVAL_MS = 200
"""Workers' heartbeat while some model is evicted: a worker learns that a model was
placed on it on demand at its next report, and a request waits for that meanwhile
(a shorter heartbeat costs the router a report, and a placement, per worker each time)."""


class RouterServicer(mpb_grpc.RouterServicer):
    def __init__(
        self,
        core: RouterCore,
        repository: Path,
        report_interval_ms: int,
        models: RepositoryManager | None = None,
    ) -> None:
        self.core = core
        self.repository = repository
        self.report_interval_ms = report_interval_ms
        self.statistics = StatisticsBook()
        self.models = models

    def _table(self, snap: TableSnapshot) -> mpb.RoutingTable:
        table = mpb.RoutingTable(generation=snap.generation, payload_keys=snap.payload_keys)
        for m in snap.models:
            key = (m.name, m.version)
            spec = spec_from_info(
                m, ready=key in snap.ready, repository=self.repository, load_error=snap.failed.get(key, "")
            )
            spec.state = snap.state(key)
            if (ensemble := snap.ensembles.get(key)) is not None:
                spec.ensemble_steps.extend(ensemble_steps_to_pb(ensemble))
            table.models.append(_with_residency(spec, m, snap))
        table.splits.extend(split_to_pb(split) for split in snap.splits)
        return table

    async def SetTrafficSplit(  # noqa: N802
        self, request: mpb.TrafficSplit, context: grpc.aio.ServicerContext[mpb.TrafficSplit, mpb.TrafficSplit]
    ) -> mpb.TrafficSplit:
        """Override a model's split until the router restarts (no weights: back to config.yaml's)."""
        try:
            return split_to_pb(await self.core.set_split(split_from_pb(request)))
        except MeshError as error:
            await context.abort(error.code, error.message)
            raise

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
        self.statistics.record(
            request.worker_id, {(m.name, m.version): m.statistics for m in request.models if m.HasField("statistics")}
        )
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
            payload_keys=request.payload_keys,
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

    async def ModelStatistics(  # noqa: N802
        self,
        request: pb.ModelStatisticsRequest,
        context: grpc.aio.ServicerContext[pb.ModelStatisticsRequest, pb.ModelStatisticsResponse],
    ) -> pb.ModelStatisticsResponse:
        """Triton's statistics, summed over workers (:mod:`router.statistics`)."""
        try:
            keys = requested(self.core.models, request.name, request.version)
        except MeshError as error:
            await context.abort(error.code, error.message)
        return pb.ModelStatisticsResponse(model_stats=self.statistics.totals(keys))

    # -------------------------------------------------- the repository API (router/lifecycle.py)

    async def RepositoryIndex(  # noqa: N802
        self,
        request: pb.RepositoryIndexRequest,
        context: grpc.aio.ServicerContext[pb.RepositoryIndexRequest, pb.RepositoryIndexResponse],
    ) -> pb.RepositoryIndexResponse:
        entries = await answer(context, self._models().index(ready_only=request.ready))
        model = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[
                model(name=e.name, version="" if e.version is None else str(e.version), state=e.state, reason=e.reason)
                for e in entries
            ]
        )

    async def RepositoryModelLoad(  # noqa: N802
        self,
        request: pb.RepositoryModelLoadRequest,
        context: grpc.aio.ServicerContext[pb.RepositoryModelLoadRequest, pb.RepositoryModelLoadResponse],
    ) -> pb.RepositoryModelLoadResponse:
        async def load() -> int:
            config, files = load_arguments(request)
            timeout_s = context.time_remaining()
            return await self._models().load(request.model_name, config=config, files=files, timeout_s=timeout_s)

        generation = await answer(context, load())
        context.set_trailing_metadata(((GENERATION_TRAILER, str(generation)),))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(  # noqa: N802
        self,
        request: pb.RepositoryModelUnloadRequest,
        context: grpc.aio.ServicerContext[pb.RepositoryModelUnloadRequest, pb.RepositoryModelUnloadResponse],
    ) -> pb.RepositoryModelUnloadResponse:
        # Triton's parameter: unload the ensembles that name this model as well
        dependents = "unload_dependents" in request.parameters and request.parameters["unload_dependents"].bool_param
        generation = await answer(context, self._models().unload(request.model_name, dependents=dependents))
        context.set_trailing_metadata(((GENERATION_TRAILER, str(generation)),))
        return pb.RepositoryModelUnloadResponse()

    def _models(self) -> RepositoryManager:
        assert self.models is not None, "a router serving the repository API is given its RepositoryManager"
        return self.models


def _with_residency(spec: mpb.ModelSpec, info: ModelInfo, snap: TableSnapshot) -> mpb.ModelSpec:
    """``spec`` with what residency says: pinned, evicted (loads on demand; its state,
    LOADING while placed, else UNAVAILABLE, is ``TableSnapshot.state``'s) and the
    measured load time."""
    key = (info.name, info.version)
    spec.pinned = info.pinned
    spec.load_ms = snap.load_ms.get(key, 0)
    spec.evicted = key in snap.evicted and key not in snap.ready
    return spec


def _slot(request: mpb.WorkerReport) -> Slot:
    """The worker's device; an older worker that does not describe it: guessed from its id."""
    if not request.device_kind:
        return slot_from_id(request.device)
    return Slot(request.device, request.device_kind, request.device_profile, request.device_memory_bytes)


async def answer(context: grpc.aio.ServicerContext[Any, Any], work: Awaitable[T]) -> T:
    """``work``'s result, or the call aborted with the MeshError's status and message."""
    try:
        return await work
    except MeshError as error:
        await _abort(context, error)


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: MeshError) -> NoReturn:
    await context.abort(error.code, error.message)
    raise AssertionError("abort returns only by raising")


def load_arguments(request: pb.RepositoryModelLoadRequest) -> tuple[str | None, dict[str, bytes]]:
    """Triton's load parameters: ``config`` (JSON text) and ``file:<version>/<name>`` (bytes)."""
    config: str | None = None
    files: dict[str, bytes] = {}
    for key, value in request.parameters.items():
        kind = value.WhichOneof("parameter_choice")
        if key == "config":
            if kind != "string_param":
                raise InvalidArgument("parameter 'config': expected a string (Triton's JSON model config)")
            config = value.string_param
        elif key.startswith(FILE_PREFIX):
            if kind != "bytes_param":
                raise InvalidArgument(f"parameter '{key}': expected bytes (the file's content)")
            files[key.removeprefix(FILE_PREFIX)] = value.bytes_param
        else:
            raise InvalidArgument(f"parameter '{key}': not supported (config, file:<version>/<name>)")
    return config, files
