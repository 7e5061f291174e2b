"""More models than memory: which model versions stay resident, the rest loaded on demand.

The router's :func:`router.placement.place` packs model versions onto devices by
their estimated bytes. When they do not all fit, :class:`ResidencyBook` decides
which go in, in this order:

1. pinned models (config.yaml ``pinned: true``): never evicted;
2. resident models that must stay: requests queued or in flight (``busy``), or
   placed less than ``min_residency_s`` ago (hysteresis: a model just loaded is
   not evicted for the next one, or two models taking turns would load forever);
3. every other model, most recently used first (last use: a worker's reported
   request count grew, or a gateway demanded it, :meth:`ResidencyBook.used`).

Each candidate is kept if the placement of everything kept so far plus it still
fits; the others are *evicted*: not placed, loaded again on demand. A model that
fits on no allowed device even alone stays *unplaceable* (the placement's error),
never evicted. Room left over goes to extra copies of hot models (mean queue wait
at least ``HOT_QUEUE_WAIT_S``: one more copy per multiple of it, one per device at
most); copies are placed only after every model that fits, so they are the first
to go when another model needs the room.

Off the hot path: the router calls :meth:`ResidencyBook.plan` when a worker
reports, a gateway demands a model, or the expiry tick runs. The figures kept
here (evictions, placements) are cumulative, for the router's metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field

from router.placement import Demand, ModelKey, Placement, Slot, allows, place

DEFAULT_MIN_RESIDENCY_S = 10.0
"""A model placed less than this long ago is not evicted for another (hysteresis)."""

HOT_QUEUE_WAIT_S = 0.05
"""A model whose requests waited this long on average (over the workers' last
report intervals) asks for a second copy, twice as long a third, and so on."""

EVICTED = "evicted"
WAITING = "waiting for a device"
"""The reasons a model version is not resident (Triton's RepositoryIndex ``reason``):
it was resident and made room for others, or it has not been placed yet."""


@dataclass(frozen=True, slots=True)
class ResidencyPlan:
    """What :meth:`ResidencyBook.plan` decided: the placement and who was left out."""

    placement: Placement
    evicted: frozenset[ModelKey] = frozenset()  # fits alone, but not with the models kept
    copies: Mapping[ModelKey, int] = field(default_factory=dict)  # devices holding each hot model, when > 1


@dataclass(frozen=True, slots=True)
class ResidencyFigures:
    """One model version's residency, for the router's metrics and ``meshserve top``."""

    devices: tuple[str, ...]  # placed on these now (several: copies of a hot model)
    evicted: bool  # not resident: loads on demand
    pinned: bool
    loads: int  # cumulative: times a worker reported it ready after it was not
    unloads: int  # cumulative: times a live worker stopped serving it
    evictions: int  # cumulative: times it left the placement for room
    load_ms: int  # the latest measured load and warm-up; 0: not measured


class ResidencyBook:
    """Last use, placement time and eviction counts per model version; owned by the router core.

    ``clock``: monotonic seconds (the core's). ``busy`` is replaced whole by the
    core: the model versions with requests queued or in flight.
    """

    def __init__(
        self, *, min_residency_s: float = DEFAULT_MIN_RESIDENCY_S, clock: Callable[[], float], headroom_ratio: float
    ) -> None:
        self.min_residency_s = min_residency_s
        self._clock = clock
        self._headroom_ratio = headroom_ratio
        self.last_used_s: dict[ModelKey, float] = {}
        self.placed_since_s: dict[ModelKey, float] = {}  # currently placed: since when
        self.was_resident: set[ModelKey] = set()  # placed at some time: evicted now means "evicted"
        self.evictions: dict[ModelKey, int] = {}  # cumulative: times it left the placement for room
        self.loads: dict[ModelKey, int] = {}  # cumulative, over workers: became ready
        self.unloads: dict[ModelKey, int] = {}  # cumulative, over workers: stopped being ready
        self.busy: frozenset[ModelKey] = frozenset()

    def used(self, key: ModelKey) -> None:
        """``key`` served or was asked for now: the most recently used."""
        self.last_used_s[key] = self._clock()

    def worker_changed(self, before: Collection[ModelKey], after: Collection[ModelKey]) -> None:
        """Count loads and unloads from a worker's ready set before and after a report."""
        for key in after:
            if key not in before:
                self.loads[key] = self.loads.get(key, 0) + 1
        for key in before:
            if key not in after:
                self.unloads[key] = self.unloads.get(key, 0) + 1

    def reason(self, key: ModelKey) -> str:
        """Why ``key`` is not resident: ``EVICTED`` once it was, else ``WAITING``."""
        return EVICTED if key in self.was_resident else WAITING

    def protected(self, key: ModelKey, now_s: float) -> bool:
        """Placed, and busy or placed less than ``min_residency_s`` ago: not evicted now."""
        since = self.placed_since_s.get(key)
        return since is not None and (key in self.busy or now_s - since < self.min_residency_s)

    def order(self, demands: Iterable[Demand], pinned: Collection[ModelKey]) -> list[Demand]:
        """Who gets room first: pinned, then protected, then most recently used (never
        used: last, by key)."""
        now_s = self._clock()

        def rank(demand: Demand) -> tuple[int, float, ModelKey]:
            tier = 0 if demand.key in pinned else 1 if self.protected(demand.key, now_s) else 2
            return tier, -self.last_used_s.get(demand.key, float("-inf")), demand.key

        return sorted(demands, key=rank)

    def signature(self, demands: Iterable[Demand], pinned: Collection[ModelKey]) -> tuple[object, ...]:
        """What :meth:`plan` depends on besides the devices and demands: the plan is
        recomputed only when it changes."""
        now_s = self._clock()
        order = tuple(d.key for d in self.order(demands, pinned))
        return order, frozenset(k for k in self.placed_since_s if self.protected(k, now_s))

    def plan(
        self,
        slots: Collection[Slot],
        demands: Collection[Demand],
        *,
        pinned: Collection[ModelKey] = frozenset(),
        queue_wait_s: Mapping[ModelKey, float] | None = None,
    ) -> ResidencyPlan:
        """Place what fits (see the module docstring) and record the change: placement
        times, evictions. ``queue_wait_s``: mean queue wait per model version."""
        everything = place(slots, demands, headroom_ratio=self._headroom_ratio)
        if not everything.unplaceable:
            return self._record(self._with_copies(everything, slots, demands, queue_wait_s or {}))
        # fits on no device even alone: the placement's error, not an eviction
        hopeless = {entry.key for entry in everything.unplaceable if self._alone(slots, entry.key, demands)}
        kept: list[Demand] = []
        evicted: set[ModelKey] = set()
        for demand in self.order((d for d in demands if d.key not in hopeless), pinned):
            trial = place(slots, [*kept, demand], headroom_ratio=self._headroom_ratio)
            if trial.unplaceable:
                evicted.add(demand.key)
            else:
                kept.append(demand)
        placement = place(
            slots, [*kept, *(d for d in demands if d.key in hopeless)], headroom_ratio=self._headroom_ratio
        )
        return self._record(self._with_copies(placement, slots, kept, queue_wait_s or {}, evicted=evicted))

    def _alone(self, slots: Collection[Slot], key: ModelKey, demands: Collection[Demand]) -> bool:
        """Whether ``key`` fits nowhere even on empty devices."""
        alone = [d for d in demands if d.key == key]
        return bool(place(slots, alone, headroom_ratio=self._headroom_ratio).unplaceable)

    def _with_copies(
        self,
        placement: Placement,
        slots: Collection[Slot],
        demands: Collection[Demand],
        queue_wait_s: Mapping[ModelKey, float],
        *,
        evicted: Collection[ModelKey] = (),
    ) -> ResidencyPlan:
        """``placement`` plus extra copies of hot models, in the room left over."""
        wanted = {
            key: 1 + int(wait_s / HOT_QUEUE_WAIT_S)
            for key, wait_s in queue_wait_s.items()
            if wait_s >= HOT_QUEUE_WAIT_S and key not in evicted
        }
        if not wanted or len(slots) < 2:
            return ResidencyPlan(placement, frozenset(evicted))
        by_key = {d.key: d for d in demands}
        free = _free_bytes(slots, placement, by_key, self._headroom_ratio)
        held: dict[str, list[ModelKey]] = {device: list(keys) for device, keys in placement.assignments}
        copies: dict[ModelKey, int] = {}
        for key in sorted(wanted, key=lambda k: (-queue_wait_s[k], k)):  # hottest first
            demand = by_key.get(key)
            if demand is None:
                continue
            count = sum(key in keys for keys in held.values())
            for slot in sorted(slots, key=lambda s: (-(free.get(s.device_id) or 0), s.device_id)):
                if count >= wanted[key] or count == 0:
                    break
                room = free.get(slot.device_id)
                fits = room is None or room >= demand.estimate_bytes
                if key in held.get(slot.device_id, ()) or not allows(slot, demand) or not fits:
                    continue
                held.setdefault(slot.device_id, []).append(key)
                if room is not None:
                    free[slot.device_id] = room - demand.estimate_bytes
                count += 1
            if count > 1:
                copies[key] = count
        assignments = tuple((device, tuple(sorted(keys))) for device, keys in sorted(held.items()))
        return ResidencyPlan(Placement(assignments, placement.unplaceable), frozenset(evicted), copies)

    def _record(self, plan: ResidencyPlan) -> ResidencyPlan:
        """Placement times of the newly placed, evictions of those that left for room."""
        now_s = self._clock()
        placed = {key for _, keys in plan.placement.assignments for key in keys}
        for key in list(self.placed_since_s):
            if key not in placed:
                del self.placed_since_s[key]
                if key in plan.evicted:
                    self.evictions[key] = self.evictions.get(key, 0) + 1
        for key in placed:
            if key not in self.placed_since_s:
                self.placed_since_s[key] = now_s
                self.was_resident.add(key)
        return plan


def _free_bytes(
    slots: Collection[Slot], placement: Placement, demands: Mapping[ModelKey, Demand], headroom_ratio: float
) -> dict[str, int | None]:
    """Per device: memory left after headroom and what ``placement`` put there; None: unknown."""
    free: dict[str, int | None] = {}
    for slot in slots:
        if slot.memory_bytes <= 0:
            free[slot.device_id] = None
            continue
        used = sum(demands[key].estimate_bytes for key in placement.on(slot.device_id) if key in demands)
        free[slot.device_id] = int(slot.memory_bytes * (1 - headroom_ratio)) - used
    return free
