"""More models than memory, without gRPC: the residency book's choices (LRU order,
pinned, busy, hysteresis, hot copies) and the router core applying them (demand,
the evicted flag until a worker reports the model ready). A fake clock drives time."""

from __future__ import annotations

from pathlib import Path

from meshserve.models.repository import ModelInfo, PlacementConfig
from router.core import RouterCore
from router.placement import Demand, ModelKey, Slot
from router.residency import EVICTED, WAITING, ResidencyBook

MIB = 2**20


class Clock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def _demands(count: int, size_mib: int = 10) -> list[Demand]:
    return [Demand((f"m{i:02d}", 1), size_mib * MIB, "cpu") for i in range(count)]


def _cpu(room_for: int, size_mib: int = 10) -> Slot:
    """A CPU budget with room for ``room_for`` models of ``size_mib`` (no headroom here)."""
    return Slot("cpu", "cpu", memory_bytes=room_for * size_mib * MIB)


def _placed(plan_assignments: tuple[tuple[str, tuple[ModelKey, ...]], ...]) -> set[ModelKey]:
    return {key for _, keys in plan_assignments for key in keys}


def test_the_most_recently_used_fit_and_the_least_recently_used_are_evicted() -> None:
    clock = Clock()
    book = ResidencyBook(min_residency_s=0, clock=clock, headroom_ratio=0)
    demands = _demands(6)
    for i in (4, 1, 5, 0, 2, 3):  # m03 used last, m04 first
        clock.now_s += 1
        book.used((f"m{i:02d}", 1))
    plan = book.plan([_cpu(3)], demands)
    assert _placed(plan.placement.assignments) == {("m02", 1), ("m03", 1), ("m00", 1)}
    assert plan.evicted == {("m04", 1), ("m01", 1), ("m05", 1)}
    assert not plan.placement.unplaceable  # evicted, not an error
    assert book.reason(("m04", 1)) == WAITING  # never resident yet

    clock.now_s += 1
    book.used(("m04", 1))  # demanded: the least recently used resident (m00) goes
    plan = book.plan([_cpu(3)], demands)
    assert _placed(plan.placement.assignments) == {("m02", 1), ("m03", 1), ("m04", 1)}
    assert book.reason(("m00", 1)) == EVICTED
    assert book.evictions == {("m00", 1): 1}


def test_pinned_and_busy_models_are_never_evicted_and_fresh_ones_wait() -> None:
    clock = Clock()
    book = ResidencyBook(min_residency_s=30, clock=clock, headroom_ratio=0)
    demands = _demands(4)
    pinned = {("m00", 1)}  # never used, yet always placed
    book.plan([_cpu(2)], demands, pinned=pinned)
    first = book.plan([_cpu(2)], demands, pinned=pinned)
    assert _placed(first.placement.assignments) == {("m00", 1), ("m01", 1)}

    clock.now_s += 5
    book.used(("m03", 1))  # m01 was placed 5 s ago: within the minimum residency
    plan = book.plan([_cpu(2)], demands, pinned=pinned)
    assert _placed(plan.placement.assignments) == {("m00", 1), ("m01", 1)}
    assert ("m03", 1) in plan.evicted

    clock.now_s += 60  # past it, but m01 has requests queued
    book.busy = frozenset({("m01", 1)})
    assert _placed(book.plan([_cpu(2)], demands, pinned=pinned).placement.assignments) == {("m00", 1), ("m01", 1)}

    book.busy = frozenset()  # idle now: m03 takes its place, the pinned one stays
    assert _placed(book.plan([_cpu(2)], demands, pinned=pinned).placement.assignments) == {("m00", 1), ("m03", 1)}


def test_a_model_too_large_for_any_device_is_unplaceable_not_evicted() -> None:
    book = ResidencyBook(min_residency_s=0, clock=Clock(), headroom_ratio=0)
    demands = [*_demands(3), Demand(("huge", 1), 1000 * MIB, "cpu")]
    plan = book.plan([_cpu(2)], demands)
    assert [entry.key for entry in plan.placement.unplaceable] == [("huge", 1)]
    assert ("huge", 1) not in plan.evicted
    assert len(plan.evicted) == 1


def test_hot_models_get_copies_in_the_room_left_and_lose_them_first() -> None:
    clock = Clock()
    book = ResidencyBook(min_residency_s=0, clock=clock, headroom_ratio=0)
    slots = [Slot("cpu", "cpu", memory_bytes=30 * MIB), Slot("cuda:0", "gpu", memory_bytes=30 * MIB)]
    demands = [Demand((f"m{i}", 1), 10 * MIB, "any") for i in range(3)]
    plan = book.plan(slots, demands, queue_wait_s={("m0", 1): 0.2, ("m1", 1): 0.01})
    assert plan.copies == {("m0", 1): 2}  # m1's wait is under the threshold
    assert sum(("m0", 1) in keys for _, keys in plan.placement.assignments) == 2

    more = [*demands, *(Demand((f"n{i}", 1), 10 * MIB, "any") for i in range(3))]
    for demand in more[3:]:
        clock.now_s += 1
        book.used(demand.key)
    plan = book.plan(slots, more, queue_wait_s={("m0", 1): 0.2})
    assert plan.copies == {}  # the room went to models, not to a second copy
    assert not plan.evicted


def test_without_a_budget_everything_is_placed() -> None:
    book = ResidencyBook(min_residency_s=0, clock=Clock(), headroom_ratio=0)
    plan = book.plan([Slot("cpu", "cpu")], _demands(50))
    assert len(_placed(plan.placement.assignments)) == 50
    assert not plan.evicted


def _info(name: str, *, pinned: bool = False) -> ModelInfo:
    return ModelInfo(
        name=name,
        version=1,
        path=Path(f"/models/{name}/1/model.onnx"),
        inputs=(),
        outputs=(),
        max_batch_size=0,
        max_queue_delay_us=0,
        preferred_batch_sizes=(),
        max_queue_size=0,
        placement=PlacementConfig(device="cpu", memory_bytes=10 * MIB),
        pinned=pinned,
    )


async def test_the_core_evicts_places_on_demand_and_flags_until_ready() -> None:
    clock = Clock()
    core = RouterCore(
        [_info("a", pinned=True), _info("b"), _info("c")], clock=clock, headroom_ratio=0, min_residency_s=0
    )
    slot = Slot("cpu", "cpu", memory_bytes=20 * MIB)
    assigned = await core.report("w1", "cpu", set(), draining=False, slot=slot)
    assert [m.name for m in assigned] == ["a", "b"]
    snap = core.snapshot()
    assert snap.evicted == {("c", 1)}
    assert not snap.loading
    assert snap.reasons == {("c", 1): WAITING}
    assert ("c", 1) not in snap.failed  # not an error: it loads on demand

    await core.report("w1", "cpu", {("a", 1), ("b", 1)}, draining=False, slot=slot, load_ms={("b", 1): 40})
    clock.now_s += 1
    placed, expected_ms, reason = await core.demand(("c", 1))
    assert (placed, reason) == (True, "")
    assert expected_ms == 0  # c never loaded: not measured
    snap = core.snapshot()
    assert snap.evicted == {("c", 1)}  # b is still served until the worker drops it
    assert snap.loading == {("c", 1)}
    assigned = await core.report("w1", "cpu", {("a", 1), ("b", 1)}, draining=False, slot=slot)
    assert [m.name for m in assigned] == ["a", "c"]  # b dropped, a pinned stays
    await core.report("w1", "cpu", {("a", 1)}, draining=False, slot=slot)  # b drained, c loading
    snap = core.snapshot()
    assert snap.evicted == {("b", 1), ("c", 1)}
    assert snap.reasons == {("b", 1): EVICTED}

    await core.report("w1", "cpu", {("a", 1), ("c", 1)}, draining=False, slot=slot, load_ms={("c", 1): 30})
    snap = core.snapshot()
    assert snap.evicted == {("b", 1)}
    assert snap.ready == {("a", 1), ("c", 1)}
    assert snap.load_ms == {("b", 1): 40, ("c", 1): 30}
    assert await core.demand(("b", 1)) == (True, 40, "")  # c is idle: it goes, a stays


async def test_the_core_keeps_a_model_with_requests_in_flight() -> None:
    clock = Clock()
    core = RouterCore([_info("a"), _info("b")], clock=clock, headroom_ratio=0, min_residency_s=0)
    slot = Slot("cpu", "cpu", memory_bytes=10 * MIB)
    await core.report("w1", "cpu", set(), draining=False, slot=slot, loads={("a", 1): (0, 0.0)})
    clock.now_s += 1
    await core.report("w1", "cpu", {("a", 1)}, draining=False, slot=slot, loads={("a", 1): (5, 0.0)})
    placed, _, reason = await core.demand(("b", 1))
    assert not placed
    assert reason.startswith(WAITING)
    clock.now_s += 1
    await core.report("w1", "cpu", {("a", 1)}, draining=False, slot=slot, loads={("a", 1): (5, 0.0)})
    assert (await core.demand(("b", 1)))[0]  # a is idle now


def test_metrics_and_top_show_where_each_model_is_resident() -> None:
    from meshserve.cli.top import build_view, take_snapshot
    from meshserve.observe.metrics import MetricsServer, RouterMetrics, RouterReads
    from router.residency import ResidencyFigures

    figures = {
        ("a", 1): ResidencyFigures(("cpu", "cuda:0"), False, True, 2, 0, 0, 40),
        ("b", 1): ResidencyFigures((), True, False, 1, 1, 1, 30),
    }
    ready = {("a", 1): True, ("b", 1): False}
    router = RouterMetrics.create(RouterReads(ready=lambda: ready, depths=dict, loads=dict, residency=lambda: figures))
    server = MetricsServer(router.registry, 0, host="127.0.0.1")
    try:
        urls = [f"http://127.0.0.1:{server.port}/metrics"]
        text = router.registry.get_sample_value("meshserve_model_evictions_total", {"model": "b", "version": "1"})
        assert text == 1
        assert router.registry.get_sample_value("meshserve_model_load_seconds", {"model": "a", "version": "1"}) == 0.04
        view = build_view(take_snapshot(urls, clock=lambda: 1.0), take_snapshot(urls, clock=lambda: 2.0))
    finally:
        server.stop()
    rows = {row.model: row.versions[0] for row in view.models}
    assert rows["a"].resident_on == ("cpu", "cuda:0")
    assert not rows["a"].evicted
    assert rows["b"].evicted
    assert rows["b"].resident_on == ()


async def test_a_model_placed_again_while_its_worker_drops_it_still_loads_on_demand() -> None:
    """Seen in the bench: re-placed while the worker still reported it ready, then
    reported not ready as the worker drained it; it must read as loading, never as
    plainly not ready (which the gateway refuses)."""
    clock = Clock()
    core = RouterCore([_info("a"), _info("b")], clock=clock, headroom_ratio=0, min_residency_s=0)
    slot = Slot("cpu", "cpu", memory_bytes=10 * MIB)
    await core.report("w1", "cpu", {("a", 1)}, draining=False, slot=slot)
    clock.now_s += 1
    assert (await core.demand(("b", 1)))[0]  # a evicted; the worker has not heard yet
    clock.now_s += 1
    assert (await core.demand(("a", 1)))[0]  # and a is wanted back at once
    await core.report("w1", "cpu", set(), draining=False, slot=slot)  # it was draining a meanwhile
    snap = core.snapshot()
    assert ("a", 1) in snap.evicted
    assert ("a", 1) in snap.loading


async def test_a_demand_reads_the_queues_and_keeps_a_model_with_requests_queued() -> None:
    clock = Clock()
    core = RouterCore([_info("a"), _info("b")], clock=clock, headroom_ratio=0, min_residency_s=0)
    slot = Slot("cpu", "cpu", memory_bytes=10 * MIB)
    await core.report("w1", "cpu", {("a", 1)}, draining=False, slot=slot)
    queued = {("a", 1)}

    async def read_queued() -> frozenset[ModelKey]:
        return frozenset(queued)

    core.read_queued = read_queued
    clock.now_s += 1
    placed, _, reason = await core.demand(("b", 1))
    assert not placed  # a has a request waiting in Redis
    assert reason.startswith(WAITING)
    queued.clear()
    assert (await core.demand(("b", 1)))[0]
