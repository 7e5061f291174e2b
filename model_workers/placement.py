"""Live placement: report to the router and follow the assignment it answers with.

Every report's answer is the router's current assignment, and the worker
follows it (``_apply``). A newly assigned model loads and warms up in a
loader thread of its own (serving the others goes on meanwhile) and is claimed
from, and reported ready, only once warm. A model no longer assigned is drained:
it is claimed from no more at once (its health entry and report say not ready),
the batch in hand finishes and its replies are written, then the session goes.
A model that fails to load is logged and tried again only after
``LOAD_RETRY_AFTER_S`` while it stays assigned, or at once when the router
assigns it afresh after taking it away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc
from redis.exceptions import RedisError

from meshserve.models.repository import load_model
from meshserve.queue import ModelKeys
from model_workers.memory import warm_up_measured
from model_workers.served import Served
from model_workers.session import LoadedModel
from model_workers.state import WorkerState
from protos import meshserve_pb2 as mpb

log = logging.getLogger(__name__)

ROUTER_WAIT_AT_START_S = 30.0
"""How long a starting worker waits for the router to answer its first report."""

LOAD_RETRY_AFTER_S = 60.0
"""A model that failed to load is tried again after this long if still assigned,
not at every heartbeat: a broken model file would otherwise load in a loop."""


class Placement(WorkerState):
    """Reports, the assignment they bring back, and the load and drop tasks it starts."""

    async def load_assigned(self) -> None:
        """Ask the router what to hold; return once each model has loaded (or failed to)."""
        with contextlib.suppress(RedisError):  # Redis down now: the first ack loads it later
            await self.queue.load_ack_script()
        # The router may still be starting (under `up`, or beside us in a cluster):
        # wait for its channel instead of failing on the first refused connection.
        sequence = self._reports_sent = self._reports_sent + 1
        assignment = await self.router.ReportWorker(self._report(), timeout=ROUTER_WAIT_AT_START_S, wait_for_ready=True)
        self._apply(assignment, sequence)
        while self._loading:
            await asyncio.gather(*self._loading.values())
        await self.report()

    def _apply(self, assignment: mpb.WorkerAssignment, sequence: int) -> None:
        """Follow the router's assignment: start loading what is new, draining what is gone.

        Only starts tasks (the worker owns them; ``close`` ends them). Reports can
        overlap, so the answer to a report older than the last one applied is ignored.
        """
        if sequence <= self._applied_report or self._stopping.is_set():
            return
        self._applied_report = sequence
        if assignment.report_interval_ms > 0:
            self.report_interval_s = assignment.report_interval_ms / 1000
        assigned = frozenset((spec.name, spec.version) for spec in assignment.models)
        for key in self._assigned - assigned:
            self._load_failed_at_s.pop(key, None)  # assigned afresh later: tried at once
        self._assigned = assigned
        now_s = time.monotonic()
        for key in sorted(assigned):
            failed_at_s = self._load_failed_at_s.get(key)
            if key in self.served or key in self._loading:
                continue
            if failed_at_s is not None and now_s - failed_at_s < LOAD_RETRY_AFTER_S:
                continue
            self._load_failed_at_s.pop(key, None)
            self._loading[key] = asyncio.create_task(self._load_and_serve(key), name=f"load {key[0]}/{key[1]}")
        dropped = [(key, s) for key, s in self.served.items() if key not in assigned and self._claims(s)]
        for key, served in dropped:
            del self._by_wake[served.keys.wake]  # no claim of it from now on
            self._dropping[key] = asyncio.create_task(self._drop(key, served), name=f"drop {key[0]}/{key[1]}")
        if dropped:
            self._wake_serve_loop()
            self.on_readiness_change()

    async def _load_and_serve(self, key: tuple[str, int]) -> None:
        """Load and warm ``key`` up in the loader thread, then serve it and report it ready."""
        name, version = key
        try:
            model = await asyncio.get_running_loop().run_in_executor(self._loader, self._load, name, version)
        except Exception:
            log.exception(
                "model %s version %d failed to load; not serving it (tried again in %.0f s if still assigned)",
                name,
                version,
                LOAD_RETRY_AFTER_S,
            )
            self._load_failed_at_s[key] = time.monotonic()
            return
        finally:
            self._loading.pop(key, None)
        if self._stopping.is_set() or key not in self._assigned:
            log.info("model %s version %d loaded but no longer assigned; not serving it", name, version)
            self.activation_bytes.pop(key, None)
            return
        served = Served(model, ModelKeys.for_model(name, version), weights_bytes=model.info.weights_bytes)
        self.served[key] = served
        self._by_wake[served.keys.wake] = served
        self._known_keys[served.keys.wake] = served.keys
        self._rescan = True  # jobs may have queued while it loaded
        self._wake_serve_loop()
        self.on_readiness_change()
        await self._report_quietly()

    async def _drop(self, key: tuple[str, int], served: Served) -> None:
        """Drain a model no longer assigned (already claimed from no more): let the batch
        in hand finish and its replies be written, then let the session go and report."""
        try:
            await served.idle.wait()
            if self._reply_tasks:
                await asyncio.gather(*list(self._reply_tasks), return_exceptions=True)
            del self.served[key]
            self.activation_bytes.pop(key, None)
        finally:
            self._dropping.pop(key, None)
        log.info("dropped model %s version %d: the router placed it elsewhere", *key)
        self.on_readiness_change()
        await self._report_quietly()

    def _load(self, name: str, version: int) -> LoadedModel:
        """Read, load and warm up one model version; runs in the loader thread."""
        info = load_model(self.settings.model_repository / name, version)
        model = LoadedModel(
            info,
            device=self.settings.device,
            intra_op_threads=self.settings.intra_op_threads,
            spinning=self.settings.intra_op_spinning,
        )
        took_s, activation_bytes = warm_up_measured(model, self.memory_probe)
        self.activation_bytes[(info.name, info.version)] = activation_bytes
        log.info("loaded %s version %d, warm-up %.0f ms", info.name, info.version, took_s * 1000)
        return model

    def _report(self) -> mpb.WorkerReport:
        return mpb.WorkerReport(
            worker_id=self.worker_id,
            device=self.settings.device,
            device_kind=self.device_description.kind,
            device_profile=self.device_description.profile,
            device_memory_bytes=self.device_description.memory_bytes,
            draining=self.draining,
            models=[
                mpb.ModelState(
                    name=name,
                    version=version,
                    ready=s.model.ready and self._claims(s),
                    items_total=s.stats.items,
                    requests_total=s.stats.requests,
                    device_seconds_total=s.stats.device_seconds,
                    queue_wait_seconds_total=s.stats.queue_wait_seconds,
                    weights_bytes=s.weights_bytes,
                    activation_bytes=self.activation_bytes.get((name, version), 0),
                )
                for (name, version), s in self.served.items()
            ],
        )

    async def report(self) -> None:
        """Report to the router, and follow the assignment it answers with."""
        sequence = self._reports_sent = self._reports_sent + 1
        assignment = await self.router.ReportWorker(self._report(), timeout=5)
        self._apply(assignment, sequence)

    async def report_forever(self) -> None:
        """Heartbeat to the router every ``report_interval_s``; a router outage is
        logged, never fatal."""
        while not self._stopping.is_set():
            self.device_sample = self.device_monitor.sample()
            try:
                await self.report()
            except grpc.aio.AioRpcError as exc:
                log.warning("router unreachable (%s); serving on", exc.code().name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.report_interval_s)
