"""Reporting to the router: what the worker holds and how busy its device is, every
heartbeat and at each change; every answer is the router's current assignment,
handed to the assignment follower."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from meshserve.settings import WorkerSettings
from model_workers.assignment import AssignmentFollower
from model_workers.devices import DeviceMonitor, DeviceSample
from model_workers.held import HeldModels
from model_workers.memory import DeviceDescription
from protos import meshserve_pb2 as mpb
from protos import meshserve_pb2_grpc as mpb_grpc

log = logging.getLogger(__name__)

REPORT_INTERVAL_S = 1.0
"""Heartbeat interval until the router's answer says otherwise (``report_interval_ms``)."""

REPORT_TIMEOUT_S = 5.0
"""How long a report waits for the router's answer once the worker is up."""


class Reporter:
    """Owns the router stub (``router``), the report sequence and the heartbeat's interval."""

    def __init__(
        self,
        settings: WorkerSettings,
        router: mpb_grpc.RouterStub,
        held: HeldModels,
        follower: AssignmentFollower,
        device_description: DeviceDescription,
        device_monitor: DeviceMonitor,
        stopping: asyncio.Event,
    ) -> None:
        self.router = router
        self._worker_id = settings.worker_id
        self._device = settings.device
        self._held = held
        self._follower = follower
        self._description = device_description
        self._monitor = device_monitor
        self._stopping = stopping
        self.device_sample: DeviceSample = device_monitor.sample()  # the latest, taken each heartbeat
        self.interval_s = REPORT_INTERVAL_S
        self._sent = 0
        self._applied = 0  # the report whose answer was applied last
        self._in_flight: set[asyncio.Task[None]] = set()

    async def report(self, timeout_s: float = REPORT_TIMEOUT_S, *, wait_for_router: bool = False) -> None:
        """Report to the router, and follow the assignment it answers with.

        ``wait_for_router``: wait up to ``timeout_s`` for the router's channel instead of
        failing on the first refused connection (a router still starting). Reports can
        overlap, so the answer to a report older than the last one applied is ignored,
        as is any answer once the worker is stopping."""
        sequence = self._sent = self._sent + 1
        assignment = await self.router.ReportWorker(self._report(), timeout=timeout_s, wait_for_ready=wait_for_router)
        if sequence <= self._applied or self._stopping.is_set():
            return
        self._applied = sequence
        if assignment.report_interval_ms > 0:
            self.interval_s = assignment.report_interval_ms / 1000
        self._follower.follow(assignment)

    async def report_quietly(self) -> None:
        """``report``, a router outage ignored (the next heartbeat reports again)."""
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self.report()

    def report_soon(self) -> None:
        """Start ``report_quietly`` in a task of this object's (``flushed`` waits for it)."""
        task = asyncio.create_task(self.report_quietly())
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def flushed(self) -> None:
        """Return once every report ``report_soon`` started has ended."""
        if self._in_flight:
            await asyncio.gather(*list(self._in_flight), return_exceptions=True)

    async def report_forever(self) -> None:
        """Sample the device and heartbeat to the router every ``interval_s``; a router
        outage is logged, never fatal."""
        while not self._stopping.is_set():
            self.device_sample = self._monitor.sample()
            try:
                await self.report()
            except grpc.aio.AioRpcError as exc:
                log.warning("router unreachable (%s); serving on", exc.code().name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.interval_s)

    def _report(self) -> mpb.WorkerReport:
        held = self._held
        return mpb.WorkerReport(
            worker_id=self._worker_id,
            device=self._device,
            device_kind=self._description.kind,
            device_profile=self._description.profile,
            device_memory_bytes=self._description.memory_bytes,
            draining=self._stopping.is_set(),
            payload_keys=True,  # QueueProtocol.fetch_bulk reads them
            models=[
                mpb.ModelState(
                    name=name,
                    version=version,
                    ready=s.model.ready and held.claims(s),
                    items_total=s.stats.items,
                    requests_total=s.stats.requests,
                    device_seconds_total=s.stats.device_seconds,
                    queue_wait_seconds_total=s.stats.queue_wait_seconds,
                    weights_bytes=s.weights_bytes,
                    activation_bytes=s.activation_bytes,
                    statistics=s.statistics.to_proto(name, version),
                    load_ms=round(self._follower.load_ms.get((name, version), 0.0)),
                )
                for (name, version), s in held.served.items()
            ]
            + [
                mpb.ModelState(name=name, version=version, ready=False, load_error=reason)
                for (name, version), reason in self._follower.failures().items()
                if (name, version) not in held.served
            ],
        )
