"""More models than memory, through the whole mesh: 30 models, room for 10 on one CPU worker.

Each model is the tiny fixed adder with ``placement.memory_mb: 10`` (so the figures
are the config's, not a measurement), and the worker's ``--memory-budget-mb`` is
115: 103.5 MiB after the 10 % headroom, room for 10. ``m00`` is pinned. Requests
spread over every model must all be answered OK within their deadlines while
models come and go; the least recently used goes first; the pinned one never goes;
a deadline shorter than the load is refused with a retry-after.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from redis.asyncio import Redis

from gateway.routing import RoutingView
from meshserve.devkit.examples import build_fixed_adder
from tests.support import Mesh, infer_request, infer_stub, output_arrays, start_mesh, stop_mesh

MODELS = 30
ROOM = 10
BUDGET_MB = 115  # 10 models of 10 MiB after the router's 10 % headroom, not 11
PINNED = "m00"
CALL_TIMEOUT_S = 20
CLIENTS = 3


def _repository(root: Path) -> Path:
    model = build_fixed_adder().SerializeToString()
    for i in range(MODELS):
        name = f"m{i:02d}"
        (root / name / "1").mkdir(parents=True)
        (root / name / "1" / "model.onnx").write_bytes(model)
        pinned = "pinned: true\n" if name == PINNED else ""
        (root / name / "config.yaml").write_text(f"{pinned}placement:\n  device: cpu\n  memory_mb: 10\n")
    onnx.checker.check_model(build_fixed_adder())
    return root


async def _start(redis_url: str, root: Path, *, min_residency_s: float = 0.0) -> Mesh:
    return await start_mesh(
        redis_url,
        _repository(root),
        until=lambda view: len(view.ready) == ROOM and len(view.evicted) == MODELS - ROOM,
        worker_overrides={"intra_op_threads": 1, "memory_budget_mb": BUDGET_MB, "canary_interval_s": 0},
        router_overrides={"min_residency_s": min_residency_s},
    )


async def _call(stub: object, name: str, seed: int, *, timeout_s: float = CALL_TIMEOUT_S) -> None:
    a = np.arange(4, dtype=np.int64).reshape(1, 4) + seed
    b = np.full((1, 4), 7, np.int64)
    response = await stub.ModelInfer(infer_request(name, {"a": a, "b": b}), timeout=timeout_s)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(output_arrays(response)["sum"], a + b)


def _resident(mesh: Mesh) -> set[str]:
    return {name for _, keys in mesh.router.core.placement.assignments for name, _ in keys}


async def test_requests_over_30_models_with_room_for_10_all_complete(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    mesh = await _start(redis_url, tmp_path)
    try:
        assert PINNED in _resident(mesh)
        assert len(_resident(mesh)) == ROOM
        names = [f"m{i:02d}" for i in range(MODELS)]
        rng = random.Random(18)
        schedule = [rng.sample(names, len(names)) for _ in range(CLIENTS)]  # every model, by each client
        pinned_seen: list[set[str]] = []

        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)

            async def client(order: list[str]) -> None:
                for seed, name in enumerate(order):
                    await _call(stub, name, seed)
                    pinned_seen.append(_resident(mesh))

            await asyncio.gather(*(client(order) for order in schedule))

            book = mesh.router.core.residency
            assert sum(book.evictions.values()) >= MODELS - ROOM  # models came and went
            assert all(PINNED in resident for resident in pinned_seen)
            assert (PINNED, 1) not in book.evictions
            assert mesh.gateway.gateway.demands.cold_requests >= MODELS - ROOM

            # LRU: make nine known models the most recently used, in order, then ask
            # for a tenth: the first of the nine (the least recently used) goes.
            worker = mesh.workers[0]
            evicted = sorted(name for name, _ in mesh.gateway.routing.view.evicted)
            recent, newcomer = evicted[:9], evicted[9]
            for seed, name in enumerate(recent):
                await _call(stub, name, seed)
                await worker.worker.reporter.report()  # the router stamps its use now, in this order
            assert _resident(mesh) == {PINNED, *recent}
            await _call(stub, newcomer, 0)
            assert _resident(mesh) == {PINNED, *recent[1:], newcomer}
        assert await redis.keys("ms:*job:*") == []  # nothing left behind
    finally:
        await stop_mesh(mesh)


async def test_a_deadline_shorter_than_the_load_is_told_to_retry(redis: Redis, redis_url: str, tmp_path: Path) -> None:
    mesh = await _start(redis_url, tmp_path, min_residency_s=60.0)
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            view = mesh.gateway.routing.view
            cold = sorted(name for name, _ in view.evicted)[0]
            mesh.router.core.load_ms[(cold, 1)] = 5_000  # as if measured: a load takes 5 s
            await mesh.router.core.demand((PINNED, 1))  # any change: the table carries load_ms again
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _call(stub, cold, 0, timeout_s=1.0)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert caught.value.details() is not None
            assert f"model '{cold}' version 1 " in caught.value.details()
            assert "retry after" in caught.value.details()
            trailers = dict(caught.value.trailing_metadata() or ())
            assert 0 < int(trailers["retry-after-ms"]) <= 5_000
            # every resident model was loaded less than 60 s ago: nothing can make room
            assert not mesh.router.core.residency.evictions
            assert (cold, 1) in mesh.gateway.routing.view.evicted
    finally:
        await stop_mesh(mesh)


def test_settled_counts_evicted_models() -> None:
    from protos import meshserve_pb2 as mpb

    table = mpb.RoutingTable(
        generation=1,
        models=[
            mpb.ModelSpec(name="a", version=1, ready=True),
            mpb.ModelSpec(name="b", version=1, evicted=True, state="UNAVAILABLE"),
        ],
    )
    view = RoutingView.from_table(table)
    assert view.evicted == {("b", 1)}
    assert view.settled()
