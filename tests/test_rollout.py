"""The rollout the lifecycle issue asks for, on the real in-process mesh: a closed
loop at concurrency 16 runs while version 2 is added, split 50/50, made 100%,
version 1 removed, then rolled back to version 1 (added again). Zero failed calls,
and each phase's answers follow its weights (exact at 0% and 100%, within
SHARE_TOLERANCE at 50/50). Version N answers x + N, so an answer proves its version."""

from __future__ import annotations

import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from gateway.routing import RoutingView
from meshserve.devkit.versioned import write_version, write_versioned_model
from meshserve.models.repository import scan_repository_failures
from meshserve_bench.rollout import Step, drive_rollout, offset_call
from protos import meshserve_pb2 as mpb
from protos import meshserve_pb2_grpc as mpb_grpc
from tests.support import infer_stub, start_mesh, stop_mesh

MODEL = "offset"
Drain = Callable[[], Awaitable[None]]


async def test_rollout_under_load_drops_no_call(redis_url: str, tmp_path: Path) -> None:
    # Requests naming no version stay on version 1 until the split says otherwise.
    write_versioned_model(tmp_path, MODEL, [1], "traffic: {weights: {1: 1}}\n")
    mesh = await start_mesh(redis_url, tmp_path)
    view = mesh.gateway.routing

    async def rescan(ready: frozenset[tuple[str, int]]) -> None:
        """The router reads the repository again; until the gateway's table has ``ready``."""
        await mesh.router.core.set_models(scan_repository_failures(tmp_path).models)
        await view.wait_for(lambda v: v.ready == ready and frozenset(v.models) == ready)

    def split(weights: dict[int, int]) -> Callable[[Drain], Awaitable[None]]:
        async def apply(drain: Drain) -> None:
            before = view.view.generation
            await router.SetTrafficSplit(mpb.TrafficSplit(model=MODEL, weights=weights), timeout=5)
            await view.wait_for(lambda v: v.generation > before and _weights(v) == weights)

        return apply

    async def add_version_2(drain: Drain) -> None:
        write_version(tmp_path, MODEL, 2)
        await rescan(frozenset({(MODEL, 1), (MODEL, 2)}))

    async def remove_version_1(drain: Drain) -> None:
        await split({1: 0, 2: 1})(drain)
        await drain()  # no call still on its way to version 1
        shutil.rmtree(tmp_path / MODEL / "1")
        await rescan(frozenset({(MODEL, 2)}))

    async def roll_back(drain: Drain) -> None:
        write_version(tmp_path, MODEL, 1)
        await rescan(frozenset({(MODEL, 1), (MODEL, 2)}))
        await split({1: 1, 2: 0})(drain)

    async def nothing(drain: Drain) -> None:
        return None

    try:
        async with (
            grpc.aio.insecure_channel(mesh.address) as channel,
            grpc.aio.insecure_channel(mesh.router.address) as router_channel,
        ):
            router = mpb_grpc.RouterStub(router_channel)
            steps = [
                Step("steady on v1", nothing, {1: 1.0}),
                Step("v2 added at weight 0", add_version_2, {1: 1.0}),
                Step("v2 at 50%", split({1: 1, 2: 1}), {1: 0.5, 2: 0.5}),
                Step("v2 at 100%", split({1: 0, 2: 1}), {2: 1.0}),
                Step("v1 removed", remove_version_1, {2: 1.0}),
                Step("rolled back to v1", roll_back, {1: 1.0}),
            ]
            figures = await drive_rollout(offset_call(infer_stub(channel), MODEL), steps, calls_per_phase=200)
    finally:
        await stop_mesh(mesh)
    assert figures.problems() == []
    assert sum(figures.failures.values()) == 0
    assert [sum(p.versions.values()) >= 200 for p in figures.phases] == [True] * len(steps)
    assert figures.calls >= 200 * len(steps)


def _weights(view: RoutingView) -> dict[int, int]:
    split = view.splits.get(MODEL)
    return dict(split.weights) if split else {}


def test_the_share_check_catches_a_stray_version_and_a_skewed_split() -> None:
    from collections import Counter

    from meshserve_bench.rollout import PhaseFigures, RolloutFigures

    all_v2 = PhaseFigures("v2 at 100%", {2: 1.0}, Counter({2: 199, 1: 1}))
    assert all_v2.problems() == [
        "v2 at 100%: version 1 answered 0.5% of calls, expected 0%",
        "v2 at 100%: version 2 answered 99.5% of calls, expected 100%",
    ]
    half = PhaseFigures("50/50", {1: 0.5, 2: 0.5}, Counter({1: 140, 2: 60}))
    assert len(half.problems()) == 2
    assert PhaseFigures("50/50", {1: 0.5, 2: 0.5}, Counter({1: 110, 2: 90})).problems() == []
    figures = RolloutFigures([PhaseFigures("steady", {1: 1.0}, Counter({1: 5}), [1_000_000] * 5)])
    figures.failures["UNAVAILABLE"] += 1
    assert figures.summary()["failed_calls"] == 1
    assert figures.problems()[0].startswith("1 calls failed")
