"""The router's plain core: which models exist, which workers hold them, what is ready.

Workers report what they hold (``report``); gateways watch the routing table
(``watch``), which is rebuilt whenever readiness changes. A worker that stops
reporting for ``worker_ttl_ms`` is forgotten, and its models go not-ready unless
another worker holds them. Off the hot path: nothing here runs per request.

Placement: workers report their device (a :class:`router.placement.Slot`) and
what each model measured on it; whenever the live devices or the estimates
change, the placement is recomputed (``router.placement.place``) and each worker
is told to hold the models placed on its device (workers sharing a device id all
get them). Models that fit nowhere are logged and never ready. Before any worker
has reported there is nothing to place on, and nothing is called unplaceable.
A draining worker's device is left out of the placement (its models move while
it drains) unless another worker on that device is not draining.

A model that fails to load is reported by its worker with the reason; while no live
worker serves it, the table carries that reason (``TableSnapshot.failed``; a model
placement found no room for carries the placement's), and the router logs it once
per reason. Gateways count a failed model as settled for server readiness.

More models than memory (router/residency.py): when the models do not all fit, the
pinned, the busy and the most recently used are placed and the rest are *evicted*;
a gateway's ``demand`` marks one used now and places it, evicting the least
recently used that may go. A model once evicted is flagged (``TableSnapshot.evicted``,
"loads on demand") whenever it is not ready and has not failed; ``loading`` are
those of them placed now. ``queued`` (set by the router's server from the queue depths)
and the requests a worker reported since its last report keep a model resident.

Ensembles (meshserve/models/ensemble.py) are in the table like models but never
placed: a valid one is READY while every step's version is, UNAVAILABLE while a
step's has failed (naming the step); an invalid one comes in ``unservable``.

A model that moves is handed over make-before-break: a worker that reports it
ready keeps it in its assignment until a worker on the device it is placed on
reports it ready, so it never goes unready just because it moved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field

from meshserve.models.ensemble import Ensemble
from meshserve.models.repository import ModelInfo
from meshserve.models.traffic import TrafficSplit
from router.placement import DEFAULT_HEADROOM_RATIO, Footprint, ModelKey, Placement, Slot, demand_for, placeable
from router.residency import DEFAULT_MIN_RESIDENCY_S, HOT_QUEUE_WAIT_S, ResidencyBook, ResidencyFigures
from router.splits import Splits

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelLoad:
    """One worker's cumulative counters for one model version, as last reported."""

    at_s: float  # router's monotonic clock
    requests: int
    queue_wait_s: float  # summed over those requests


@dataclass(frozen=True, slots=True)
class LoadRate:
    """What one model version is served at, over workers' last report intervals."""

    requests_per_s: float
    mean_queue_wait_s: float  # of the requests claimed in those intervals (0 if none)


@dataclass(slots=True)
class WorkerRecord:
    worker_id: str
    device: str
    ready: set[ModelKey] = field(default_factory=set)
    draining: bool = False
    last_seen_s: float = 0.0
    loads: dict[ModelKey, ModelLoad] = field(default_factory=dict)
    rates: dict[ModelKey, tuple[float, float, float]] = field(default_factory=dict)  # Δrequests, Δwait_s, Δt_s
    slot: Slot | None = None  # None: not described yet (see slot_from_id)
    failed: dict[ModelKey, str] = field(default_factory=dict)  # its last load failed: why
    held: set[ModelKey] = field(default_factory=set)  # ready as reported, known to the table or not
    payload_keys: bool = False  # reads payloads from their own keys (WorkerReport.payload_keys)


@dataclass(frozen=True, slots=True)
class TableSnapshot:
    """One generation of the routing table: every model, whether it is ready, and
    why one that is not ready failed to load (absent: not failed, maybe loading)."""

    generation: int
    models: tuple[ModelInfo, ...]
    ready: frozenset[ModelKey]
    failed: Mapping[ModelKey, str] = field(default_factory=dict)
    unloading: frozenset[ModelKey] = frozenset()  # draining: still placed, refused at gateways
    splits: tuple[TrafficSplit, ...] = ()  # in force, by model (router/splits.py)
    evicted: frozenset[ModelKey] = frozenset()  # not resident: loads on demand (not ready)
    loading: frozenset[ModelKey] = frozenset()  # of those, placed now: a worker loads it
    load_ms: Mapping[ModelKey, int] = field(default_factory=dict)  # measured load and warm-up
    reasons: Mapping[ModelKey, str] = field(default_factory=dict)  # evicted, not loading: why
    ensembles: Mapping[ModelKey, Ensemble] = field(default_factory=dict)  # the valid ones, by version
    payload_keys: bool = False  # every live worker reads payload keys (RoutingTable.payload_keys)

    def state(self, key: ModelKey) -> str:
        """Triton's name for a version's state: READY, UNLOADING, UNAVAILABLE (failed,
        or evicted and not placed again yet), else LOADING."""
        if key in self.unloading:
            return UNLOADING
        if key in self.ready:
            return READY
        if key in self.failed or (key in self.evicted and key not in self.loading):
            return UNAVAILABLE
        return LOADING


READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"
"""A version's states, Triton's names (``ModelSpec.state``, ``RepositoryIndex``)."""


class RouterCore:
    def __init__(
        self,
        models: list[ModelInfo],
        *,
        worker_ttl_ms: int = 5000,
        clock: Callable[[], float] = time.monotonic,
        headroom_ratio: float = DEFAULT_HEADROOM_RATIO,
        unservable: Mapping[ModelKey, str] | None = None,
        min_residency_s: float = DEFAULT_MIN_RESIDENCY_S,
        ensembles: Mapping[ModelKey, Ensemble] | None = None,
    ) -> None:
        """``unservable``: versions in ``models`` that the repository could not read,
        with the problem: listed, never placed, always failed. ``ensembles``: those
        of ``models`` that are valid ensembles, READY while every step's version is."""
        self._clock = clock
        self.ensembles = dict(ensembles or {})
        self._unservable = dict(unservable or {})
        self.headroom_ratio = headroom_ratio
        self.footprints: dict[ModelKey, Footprint] = {}  # latest reported, per model version
        self.placement = Placement()  # replaced whole, never mutated: the metrics thread reads it
        self._placed_from: object = None  # the inputs of the current placement
        self.models = {(m.name, m.version): m for m in models}
        self.worker_ttl_s = worker_ttl_ms / 1000
        self.workers: dict[str, WorkerRecord] = {}
        self._generation = 0
        self._ready: frozenset[ModelKey] = frozenset()
        self._payload_keys = False  # every live worker reads payload keys, as last published
        self._failed: dict[ModelKey, str] = dict(self._unservable)  # not ready, and why: replaced whole
        self._logged_failures: dict[ModelKey, str] = {}  # the reasons logged, while they last
        self._changed = asyncio.Condition()
        self._hold_until = 0.0  # time.monotonic(): a new leader's tables with a model not ready wait till then
        self._unloading: frozenset[ModelKey] = frozenset()
        self._reported = asyncio.Condition()  # a worker reported, or was forgotten
        self.splits = Splits()

        self.residency = ResidencyBook(min_residency_s=min_residency_s, clock=clock, headroom_ratio=headroom_ratio)
        self.load_ms: dict[ModelKey, int] = {}  # the latest measured load (and warm-up) per model version
        self.queued: frozenset[ModelKey] = frozenset()  # requests waiting in Redis: replaced whole
        # reads the model versions with requests waiting now (the router's server sets it): a
        # demand reads them before it evicts anything; None: the last ``note_queued`` only
        self.read_queued: Callable[[], Awaitable[frozenset[ModelKey]]] | None = None
        self._on_demand: set[ModelKey] = set()  # evicted at some time: loads on demand whenever not ready
        self._plan_evicted: frozenset[ModelKey] = frozenset()  # by the current placement
        self._evicted: frozenset[ModelKey] = frozenset()
        self._loading: frozenset[ModelKey] = frozenset()

    def snapshot(self) -> TableSnapshot:
        reasons = {key: self.residency.reason(key) for key in self._evicted - self._loading}
        return TableSnapshot(
            self._generation,
            tuple(self.models.values()),
            self._ready,
            self._failed,
            self._unloading,
            self.splits.effective(self.models),
            self._evicted,
            self._loading,
            dict(self.load_ms),
            reasons,
            self.ensembles,
            self._payload_keys,
        )

    async def set_models(
        self,
        models: list[ModelInfo],
        *,
        unservable: Mapping[ModelKey, str] | None = None,
        unloading: frozenset[ModelKey] = frozenset(),
        ensembles: Mapping[ModelKey, Ensemble] | None = None,
    ) -> None:
        """Replace the model set (router/lifecycle.py): recompute the placement and
        publish a new table generation. ``unloading``: versions still placed (workers
        drain their queues) but never ready in the table, so gateways refuse them."""
        self.models = {(m.name, m.version): m for m in models}
        self.ensembles = dict(ensembles or {})
        self._unservable = dict(unservable or {})
        self._unloading = unloading & frozenset(self.models)
        self.footprints = {key: f for key, f in self.footprints.items() if key in self.models}
        for record in self.workers.values():
            record.ready &= set(self.models)
            record.failed = {key: why for key, why in record.failed.items() if key in self.models}
        self._placed_from = None  # the demands changed: place again
        await self._recompute(force=True)

    async def wait_settled(self, keys: Collection[ModelKey], timeout_s: float) -> TableSnapshot | None:
        """The first table where each of ``keys`` is READY or UNAVAILABLE (failed);
        None when ``timeout_s`` passed first."""
        try:
            async with asyncio.timeout(timeout_s):
                async for snap in self.watch():
                    if all(snap.state(key) in (READY, UNAVAILABLE) for key in keys):
                        return snap
        except TimeoutError:
            pass
        return None

    def held_anywhere(self, key: ModelKey) -> bool:
        """Whether a live worker last reported ``key`` ready (still holds it)."""
        return any(key in record.held for record in self.workers.values())

    async def wait_released(self, keys: Collection[ModelKey], timeout_s: float) -> bool:
        """Until no live worker holds any of ``keys`` (their reports say so); False
        when ``timeout_s`` passed first."""
        try:
            async with asyncio.timeout(timeout_s), self._reported:
                await self._reported.wait_for(lambda: not any(self.held_anywhere(key) for key in keys))
        except TimeoutError:
            return False
        return True

    async def set_split(self, split: TrafficSplit) -> TrafficSplit:
        """Override a model's traffic split at run time (no weights: back to its
        configured one) and publish it in a new table generation; the split now in
        force. Raises NotFound / InvalidArgument (router/splits.py), changing nothing."""
        current = self.splits.set(split, self.models)
        await self._publish()
        return current

    async def _publish(self) -> None:
        """A new generation whatever changed (a split is not part of readiness)."""
        async with self._changed:
            self._generation += 1
            self._changed.notify_all()

    async def report(
        self,
        worker_id: str,
        device: str,
        ready: set[ModelKey],
        *,
        draining: bool,
        loads: dict[ModelKey, tuple[int, float]] | None = None,
        slot: Slot | None = None,
        footprints: Mapping[ModelKey, Footprint] | None = None,
        failures: Mapping[ModelKey, str] | None = None,
        load_ms: Mapping[ModelKey, int] | None = None,
        payload_keys: bool = False,
    ) -> list[ModelInfo]:
        """Record a worker's state; returns the models placed on its device.

        ``slot`` describes the device (default: guessed from ``device``, memory
        unknown); ``footprints`` are the worker's measurements per model version;
        ``failures`` the models whose last load there failed, and why; ``load_ms``
        how long each model's last load there took (0: not measured);
        ``payload_keys`` whether it reads payloads from their own keys.
        """
        record = self.workers.get(worker_id)
        if record is None:
            record = self.workers[worker_id] = WorkerRecord(worker_id, device)
            log.info("worker %s (%s) joined", worker_id, device)
        record.slot = slot or record.slot or slot_from_id(device)
        for key, footprint in (footprints or {}).items():
            if key in self.models and footprint.weights_bytes > 0 and not self._unmeasured(key, footprint):
                self.footprints[key] = footprint
        self.residency.worker_changed(record.ready, ready & set(self.models))
        record.ready = ready & set(self.models)
        record.held = set(ready)
        record.failed = {key: reason for key, reason in (failures or {}).items() if key in self.models}
        record.draining = draining
        record.payload_keys = payload_keys
        record.last_seen_s = now_s = self._clock()
        for key, took_ms in (load_ms or {}).items():
            if key in self.models and took_ms > 0:
                self.load_ms[key] = took_ms
        loads = loads or {}
        record.rates = {key: rate for key, rate in record.rates.items() if key in loads}  # dropped models' too
        for key, (requests, wait_s) in loads.items():
            before = record.loads.get(key)
            record.loads[key] = ModelLoad(now_s, requests, wait_s)
            if before is not None and now_s > before.at_s and requests >= before.requests:
                record.rates[key] = (requests - before.requests, wait_s - before.queue_wait_s, now_s - before.at_s)
                if requests > before.requests and key in self.models:
                    self.residency.used(key)
        await self._recompute()
        async with self._reported:
            self._reported.notify_all()
        return [self.models[key] for key in sorted(set(self.placement.on(device)) | self._handing_over(record))]

    def _handing_over(self, record: WorkerRecord) -> set[ModelKey]:
        """Models ``record`` serves that moved elsewhere and are not ready there yet."""
        placed_on: dict[ModelKey, set[str]] = {}
        for device, keys in self.placement.assignments:
            for key in keys:
                placed_on.setdefault(key, set()).add(device)
        return {
            key
            for key in record.ready
            if (targets := placed_on.get(key, set()))
            and record.device not in targets
            and not any(
                other.device in targets and not other.draining and key in other.ready for other in self.workers.values()
            )
        }

    def _unmeasured(self, key: ModelKey, footprint: Footprint) -> bool:
        """An unmeasured report (a GPU worker's, for now) of a model already measured
        elsewhere: kept out, or the estimate would swing with whichever worker reported
        last, and with it the placement, moving the model back and forth."""
        known = self.footprints.get(key)
        return (
            footprint.activation_bytes == 0
            and known is not None
            and known.activation_bytes > 0
            and known.weights_bytes == footprint.weights_bytes
        )

    def readiness(self) -> dict[ModelKey, bool]:
        """Every model version: whether a live worker serves it (the table's readiness)."""
        snap = self.snapshot()
        return {(m.name, m.version): (m.name, m.version) in snap.ready for m in snap.models}

    def load_failures(self) -> dict[ModelKey, str]:
        """Models that failed to load (or fit no device), with the reason; the rest absent."""
        return dict(self._failed)

    def unplaceable(self) -> dict[ModelKey, bool]:
        """Every model version: whether the current placement found no room for it."""
        keys = self.placement.unplaceable_keys()
        return {key: key in keys for key in self.models}

    def _replace(self) -> None:
        """Recompute the placement if the live devices or the estimates changed."""
        slots: dict[str, Slot] = {}
        for worker_id in sorted(self.workers):  # a device shared by workers: the lowest id describes it
            record = self.workers[worker_id]
            if record.draining:
                continue
            slots.setdefault(record.device, record.slot or slot_from_id(record.device))
        demands = tuple(
            demand_for(info, self.footprints.get(key))
            for key, info in sorted(self.models.items())
            if key not in self._unservable and placeable(info)
        )
        pinned = frozenset(key for key, info in self.models.items() if info.pinned)
        waits = {key: rate.mean_queue_wait_s for key, rate in self.load_rates().items()}
        self.residency.busy = self.queued | self._in_flight()
        hot = tuple(sorted((key, int(wait_s / HOT_QUEUE_WAIT_S)) for key, wait_s in waits.items() if wait_s > 0))
        inputs = (tuple(slots.values()), demands, self.residency.signature(demands, pinned), hot)
        if inputs == self._placed_from:
            return
        self._placed_from = inputs
        if not slots:
            placement, evicted = Placement(), frozenset[ModelKey]()
        else:
            plan = self.residency.plan(slots.values(), demands, pinned=pinned, queue_wait_s=waits)
            placement, evicted = plan.placement, plan.evicted
        newly = evicted - self._plan_evicted
        self._plan_evicted = evicted
        self._on_demand |= evicted
        for key in sorted(newly):
            log.info("model %s version %d evicted: no room with the models used more recently", *key)
        if placement == self.placement:
            return
        before, self.placement = self.placement.unplaceable, placement
        log.info(
            "placement: %s",
            "; ".join(f"{device}: {len(keys)} model version(s)" for device, keys in placement.assignments) or "empty",
        )
        for entry in placement.unplaceable:
            if entry not in before:  # said once, and again only when its numbers change
                log.warning("unplaceable: %s", entry.message())

    def _in_flight(self) -> frozenset[ModelKey]:
        """Model versions a live worker computed requests of since its report before."""
        return frozenset(
            key for record in self.workers.values() for key, (requests, _, _) in record.rates.items() if requests > 0
        )

    def _placed(self, key: ModelKey) -> bool:
        return any(key in keys for _, keys in self.placement.assignments)

    async def note_queued(self, queued: frozenset[ModelKey]) -> None:
        """The model versions with requests waiting in Redis now: kept resident, and one
        evicted meanwhile (a request queued as it went) counts as demanded again."""
        self.queued = queued
        placed = {key for _, keys in self.placement.assignments for key in keys}
        for key in queued - placed:
            if key in self.models:
                self.residency.used(key)
        await self._recompute()

    async def demand(self, key: ModelKey) -> tuple[bool, int, str]:
        """A gateway asks for ``key``: used now, and placed if room can be made (evicting
        the least recently used that may go). Answers (placed, measured load ms, why not)."""
        if key not in self.models:
            return False, 0, f"unknown model {key[0]} version {key[1]}"
        self.residency.used(key)
        if self.read_queued is not None and not self._placed(key):
            self.queued = await self.read_queued()
        await self._recompute()
        expected_ms = self.load_ms.get(key, 0)
        if any(key in keys for _, keys in self.placement.assignments):
            return True, expected_ms, ""
        for entry in self.placement.unplaceable:
            if entry.key == key:
                return False, 0, f"no device has room: {entry.message()}"
        if key in self._unservable:
            return False, 0, self._unservable[key]
        return (
            False,
            expected_ms,
            (
                f"{self.residency.reason(key)}: every resident model is pinned, busy or loaded less than"
                f" {self.residency.min_residency_s:g} s ago"
            ),
        )

    def residency_figures(self) -> dict[ModelKey, ResidencyFigures]:
        """Every model version: where it is placed, whether evicted, its loads, unloads,
        evictions and load time (read by the metrics thread: values replaced whole)."""
        devices: dict[ModelKey, list[str]] = {}
        for device, keys in self.placement.assignments:
            for key in keys:
                devices.setdefault(key, []).append(device)
        book = self.residency
        return {
            key: ResidencyFigures(
                tuple(devices.get(key, ())),
                key in self._evicted,
                info.pinned,
                book.loads.get(key, 0),
                book.unloads.get(key, 0),
                book.evictions.get(key, 0),
                self.load_ms.get(key, 0),
            )
            for key, info in self.models.items()
        }

    def load_rates(self) -> dict[ModelKey, LoadRate]:
        """Per model version, summed over live workers: requests/s and mean queue wait."""
        totals: dict[ModelKey, list[float]] = {}
        for record in self.workers.values():
            for key, (requests, wait_s, elapsed_s) in record.rates.items():
                total = totals.setdefault(key, [0.0, 0.0, 0.0])
                total[0] += requests / elapsed_s
                total[1] += requests
                total[2] += wait_s
        return {
            key: LoadRate(per_s, wait_s / requests if requests else 0.0)
            for key, (per_s, requests, wait_s) in totals.items()
        }

    async def forget_silent_workers(self) -> None:
        """Drop workers that have not reported within the TTL."""
        cutoff = self._clock() - self.worker_ttl_s
        for worker_id in [w for w, rec in self.workers.items() if rec.last_seen_s < cutoff]:
            log.warning("worker %s stopped reporting; its models are no longer served by it", worker_id)
            del self.workers[worker_id]
        await self._recompute()
        async with self._reported:
            self._reported.notify_all()

    async def _recompute(self, *, force: bool = False) -> None:
        self._replace()
        unplaceable = self.placement.unplaceable_keys()
        ready = frozenset(
            key
            for rec in self.workers.values()
            if not rec.draining
            for key in rec.ready
            if key not in unplaceable and key not in self._unloading
        )
        failed = self._failures(ready, unplaceable)
        ready, failed = self._with_ensembles(ready, failed)
        placed = frozenset(key for _, keys in self.placement.assignments for key in keys)
        # Not "evicted since last ready": a worker's report of a model it is about to
        # drop would end that too soon, and the model would read as plainly not ready.
        evicted = frozenset(self._on_demand - ready - failed.keys())
        loading = evicted & placed
        # Gateways write payload keys only while no live worker would miss them: one
        # older worker (a rolling upgrade, a rollback) turns them off for the mesh.
        payload_keys = bool(self.workers) and all(record.payload_keys for record in self.workers.values())
        if (
            force
            or payload_keys != self._payload_keys
            or ready != self._ready
            or failed != self._failed
            or (evicted, loading) != (self._evicted, self._loading)
        ):
            async with self._changed:
                self._ready, self._failed = ready, failed
                self._evicted, self._loading = evicted, loading
                self._payload_keys = payload_keys
                self._generation += 1
                self._changed.notify_all()

    def _with_ensembles(
        self, ready: frozenset[ModelKey], failed: dict[ModelKey, str]
    ) -> tuple[frozenset[ModelKey], dict[ModelKey, str]]:
        """An ensemble is ready while every step's version is, and UNAVAILABLE while a
        step's has failed (the reason names the step)."""
        more = set()
        for key, ensemble in self.ensembles.items():
            steps = [(step.model, step.version) for step in ensemble.steps]
            if key not in self._unloading and all(step in ready for step in steps):
                more.add(key)
                continue
            for number, step in enumerate(steps, start=1):
                if step in failed:
                    failed[key] = f"step {number} (model '{step[0]}' version {step[1]}) is UNAVAILABLE: {failed[step]}"
                    break
        return ready | more, failed

    def _failures(self, ready: frozenset[ModelKey], unplaceable: frozenset[ModelKey]) -> dict[ModelKey, str]:
        """Models not ready that failed to load on a live worker, or that fit no device;
        each new reason logged once (the placement logs its own)."""
        failed = {entry.key: f"no device has room: {entry.message()}" for entry in self.placement.unplaceable}
        failed.update(self._unservable)  # logged by the router's server as it read the repository
        for worker_id in sorted(self.workers):
            record = self.workers[worker_id]
            for key, reason in record.failed.items():
                if key in ready or key in unplaceable or record.draining:
                    continue
                if key not in failed and self._logged_failures.get(key) != reason:
                    log.error("model %s version %d failed to load on worker %s: %s", *key, worker_id, reason)
                failed.setdefault(key, reason)
        self._logged_failures = {
            key: reason for key, reason in failed.items() if key not in unplaceable and key not in self._unservable
        }
        return failed

    def hold_unready_tables(self, seconds: float) -> None:
        """This router has just become the leader and knows no worker yet: for
        ``seconds``, ``watch`` gives no table in which a model is not ready, so that
        gateways keep serving from their last table (the old leader's) instead of
        refusing every call as not ready until the workers' next reports place the
        models again. A table with every model ready goes at once."""
        self._hold_until = time.monotonic() + seconds

    async def watch(self) -> AsyncIterator[TableSnapshot]:
        """The current table, then every new generation, until cancelled (a new
        leader's unready tables held back a while: ``hold_unready_tables``)."""
        seen = -1
        while True:
            async with self._changed:
                while True:
                    if self._generation != seen:
                        snap = self.snapshot()
                        held_s = self._hold_until - time.monotonic()
                        if held_s <= 0 or all((m.name, m.version) in snap.ready for m in snap.models):
                            break
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(held_s):
                                await self._changed.wait()
                    else:
                        await self._changed.wait()
            seen = snap.generation
            yield snap

    async def run_expiry(self, interval_s: float) -> None:
        """Owned by the router's server: forget silent workers every interval."""
        while True:
            await asyncio.sleep(interval_s)
            await self.forget_silent_workers()


def slot_from_id(device: str) -> Slot:
    """A device known only by its id: "cpu" is the CPU, a "MIG-" UUID a MIG slice,
    anything else a whole GPU; memory unknown (fits anything)."""
    if device == "cpu":
        return Slot(device, "cpu")
    return Slot(device, "mig" if device.startswith("MIG-") else "gpu")
