"""Calls in a closed loop through a Redis failover: the one driver of the Sentinel
and the Cluster failover tests. Imported by in-process tests only."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from tests.support import Mesh, infer_request, infer_stub, output_arrays

CALL_TIMEOUT_S = 15.0
CLIENTS = 8
WARM_CALLS = 200  # answered before the fault
CALLS_AFTER = 500  # answered after it: the calls go on


@dataclass(slots=True)
class Tally:
    """What a closed loop of calls saw."""

    ok: int = 0
    wrong: int = 0  # an answer that is not this call's (a reply to another call)
    failed: dict[str, int] = field(default_factory=dict)
    failed_at_s: list[float] = field(default_factory=list)
    first_failure: str = ""  # its code and details, for the message of a failed assertion


async def closed_loop(stub: Any, client: int, stop: asyncio.Event, tally: Tally) -> None:
    """One client calling "mlp" until ``stop``, each call's id its own."""
    rng = np.random.default_rng(client)
    n = 0
    while not stop.is_set():
        n += 1
        features = rng.standard_normal((1, 64)).astype(np.float32)
        request = infer_request("mlp", {"features": features}, outputs=("logits",), request_id=f"c{client}-{n}")
        try:
            response = await stub.ModelInfer(request, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            tally.failed[exc.code().name] = tally.failed.get(exc.code().name, 0) + 1
            tally.failed_at_s.append(time.monotonic())
            tally.first_failure = tally.first_failure or f"{exc.code().name}: {exc.details()}"
            continue
        if response.id != request.id or output_arrays(response)["logits"].shape != (1, 10):
            tally.wrong += 1
        else:
            tally.ok += 1


async def calls_through_a_fault(mesh: Mesh, fault: Callable[[], Awaitable[float]], what: str) -> Tally:
    """``CLIENTS`` closed loops on ``mesh``; once ``WARM_CALLS`` are answered, ``fault()``
    (it kills a master and returns the seconds until a replica was promoted); then
    ``CALLS_AFTER`` more. Prints the figures and checks: no answer is another call's,
    only UNAVAILABLE failed, only around the failover, and no call hangs."""
    tally = Tally()
    stop = asyncio.Event()
    async with grpc.aio.insecure_channel(mesh.gateway.address) as channel:
        stub = infer_stub(channel)
        clients = [asyncio.create_task(closed_loop(stub, i, stop, tally)) for i in range(CLIENTS)]
        try:
            async with asyncio.timeout(20):
                while tally.ok < WARM_CALLS:  # noqa: ASYNC110 - warm, before the fault
                    await asyncio.sleep(0.05)
            before = tally.ok
            killed_at = time.monotonic()
            promoted_s = await fault()
            async with asyncio.timeout(30):
                while tally.ok < before + CALLS_AFTER:  # noqa: ASYNC110 - the calls go on after it
                    await asyncio.sleep(0.05)
        finally:
            stop.set()
            async with asyncio.timeout(CALL_TIMEOUT_S + 5):  # a hung call is a lost one
                await asyncio.gather(*clients)
    window_s = max(tally.failed_at_s, default=killed_at) - killed_at
    executed = mesh.workers[0].worker.metrics.registry.get_sample_value(
        "meshserve_worker_batch_size_sum", {"model": "mlp", "version": "1"}
    )
    print(
        f"\n{what}: replica promoted in {promoted_s:.2f} s; calls ok {tally.ok}, wrong {tally.wrong},"
        f" failed {tally.failed}, last failure {window_s:.2f} s after the kill; model executions {executed:.0f};"
        f" replies with no waiting call {mesh.gateway.gateway.late_replies},"
        f" jobs Redis lost {mesh.gateway.gateway.lost_jobs}"
    )
    assert tally.wrong == 0
    assert set(tally.failed) <= {"UNAVAILABLE"}
    assert window_s < promoted_s + 5  # failures only around the failover, not after it
    return tally
