"""A rollout under load: a closed loop of calls runs while the versions behind one
model name change (a version added, split, made 100%, removed, rolled back).

:func:`drive_rollout` runs the loop through a list of :class:`Step` values; each
step's ``apply`` makes its change and returns once the gateway has it (the caller
decides how: the in-process test waits on the gateway's routing view, the bench on
the router's table stream); it is given ``drain``, which returns once no call begun
before it is still in flight (so that a version can be removed once no call can
still be on its way to it). Calls that begin while a change is being applied
belong to no phase (they count as calls, and as failures if they fail); the rest
are attributed to the phase they began and ended in. Each phase runs until
``calls_per_phase`` such calls answered. Used by ``meshserve bench --scenario
rollout`` (:func:`run_rollout_bench`) and tests/test_rollout.py.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from meshserve.devkit.versioned import OFFSET_WIDTH, write_versioned_model
from meshserve_bench.config import BenchConfig
from meshserve_bench.load import percentile_ms
from meshserve_bench.mesh import gateway_pid, own_mesh, progress
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from protos import meshserve_pb2 as mpb
from protos import meshserve_pb2_grpc as mpb_grpc

ROLLOUT_MODEL = "rollout"
ROLLOUT_CONCURRENCY = 16
CALL_TIMEOUT_S = 10.0
SHARE_TOLERANCE = 0.15
"""How far a phase's share of a version may be from its weight's share (absolute),
when neither is 0 or 1; those must hold exactly. With 200 calls at 50/50 the share's
standard deviation is 0.035: 0.15 is over four of them."""


@dataclass(frozen=True, slots=True)
class Step:
    """One change of the rollout: its name, how to make it (given ``drain``), the
    share each version must then get (versions absent: none)."""

    name: str
    apply: Callable[[Callable[[], Awaitable[None]]], Awaitable[None]]
    expected: Mapping[int, float]


@dataclass(slots=True)
class PhaseFigures:
    name: str
    expected: dict[int, float]
    versions: Counter[int] = field(default_factory=Counter)
    latencies_ns: list[int] = field(default_factory=list)

    def shares(self) -> dict[int, float]:
        total = sum(self.versions.values())
        return {v: n / total for v, n in sorted(self.versions.items())} if total else {}

    def problems(self, tolerance: float = SHARE_TOLERANCE) -> list[str]:
        """How the versions that answered stray from the expected shares."""
        shares = self.shares()
        problems = []
        for version in sorted(set(shares) | set(self.expected)):
            want, got = self.expected.get(version, 0.0), shares.get(version, 0.0)
            exact = want in (0.0, 1.0)
            if (exact and got != want) or (not exact and abs(got - want) > tolerance):
                problems.append(f"{self.name}: version {version} answered {got:.1%} of calls, expected {want:.0%}")
        return problems


@dataclass(slots=True)
class RolloutFigures:
    phases: list[PhaseFigures]
    calls: int = 0
    failures: Counter[str] = field(default_factory=Counter)  # by status code name
    transition_latencies_ns: list[int] = field(default_factory=list)  # calls begun during a change
    first_failure: str = ""

    def problems(self) -> list[str]:
        failed = sum(self.failures.values())
        head = [f"{failed} calls failed ({dict(self.failures)}): {self.first_failure}"] if failed else []
        return head + [p for phase in self.phases for p in phase.problems()]

    def summary(self) -> dict[str, Any]:
        """The figures as JSON: failed calls, p99 steady (the first phase) and during the rollout."""
        steady, rollout = self.phases[0], self.phases[1:]
        during = [ns for phase in rollout for ns in phase.latencies_ns] + self.transition_latencies_ns
        return {
            "calls": self.calls,
            "failed_calls": sum(self.failures.values()),
            "failures": dict(self.failures),
            "p99_steady_ms": percentile_ms(steady.latencies_ns, 99),
            "p99_rollout_ms": percentile_ms(during, 99),
            "p50_steady_ms": percentile_ms(steady.latencies_ns, 50),
            "p50_rollout_ms": percentile_ms(during, 50),
            "phases": [
                {
                    "name": p.name,
                    "calls": sum(p.versions.values()),
                    "shares": {str(v): s for v, s in p.shares().items()},
                    "expected": {str(v): s for v, s in p.expected.items()},
                    "p99_ms": percentile_ms(p.latencies_ns, 99),
                }
                for p in self.phases
            ],
            "problems": self.problems(),
        }


class ClosedLoop:
    """``concurrency`` callers, each sending its next call when the last answered."""

    def __init__(self, call: Callable[[], Awaitable[int]], concurrency: int, figures: RolloutFigures) -> None:
        self.call = call
        self.concurrency = concurrency
        self.figures = figures
        self.phase: PhaseFigures | None = None  # None: a change is being applied
        self.epoch = 0  # moves on at each phase and each drain
        self.in_flight: dict[int, int] = {}  # caller -> the epoch its call began in
        self.changed = asyncio.Condition()
        self.stopping = False

    async def run(self) -> None:
        await asyncio.gather(*(self._caller(index) for index in range(self.concurrency)))

    async def _caller(self, index: int) -> None:
        figures = self.figures
        while not self.stopping:
            began = self.phase
            self.in_flight[index] = self.epoch
            started_ns = time.perf_counter_ns()
            try:
                version = await self.call()
            except grpc.aio.AioRpcError as exc:
                figures.failures[exc.code().name] += 1
                figures.first_failure = figures.first_failure or f"{exc.code().name}: {exc.details()}"
                version = 0
            except AssertionError as exc:  # the answer does not match the version that claims it
                figures.failures["WRONG_ANSWER"] += 1
                figures.first_failure = figures.first_failure or str(exc)
                version = 0
            elapsed_ns = time.perf_counter_ns() - started_ns
            figures.calls += 1
            del self.in_flight[index]
            if version and began is not None and began is self.phase:
                began.versions[version] += 1
                began.latencies_ns.append(elapsed_ns)
            elif version:
                figures.transition_latencies_ns.append(elapsed_ns)
            async with self.changed:
                self.changed.notify_all()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        async with self.changed:
            await self.changed.wait_for(predicate)

    def settled(self) -> bool:
        """Every call in flight began in the current epoch (none from before a change)."""
        return all(epoch == self.epoch for epoch in self.in_flight.values())

    def phase_done(self, calls: int) -> Callable[[], bool]:
        """Whether the current phase has ``calls`` answers and no call from before it is in flight."""
        phase = self.phase
        assert phase is not None
        return lambda: sum(phase.versions.values()) >= calls and self.settled()

    async def drain(self) -> None:
        """Until no call begun before now is in flight."""
        self.epoch += 1
        await self.wait_for(self.settled)


async def drive_rollout(
    call: Callable[[], Awaitable[int]],
    steps: Sequence[Step],
    *,
    calls_per_phase: int,
    concurrency: int = ROLLOUT_CONCURRENCY,
    phase_timeout_s: float = 60.0,
) -> RolloutFigures:
    """Run the closed loop through ``steps`` (the first is the steady state); the figures.
    ``call`` sends one call and returns the version that answered it."""
    figures = RolloutFigures([])
    loop = ClosedLoop(call, concurrency, figures)
    runner = asyncio.create_task(loop.run(), name="rollout-loop")
    try:
        for step in steps:
            loop.phase = None
            progress(f"rollout: {step.name}")
            async with asyncio.timeout(phase_timeout_s):
                await step.apply(loop.drain)
            phase = PhaseFigures(step.name, dict(step.expected))
            figures.phases.append(phase)
            loop.phase = phase
            loop.epoch += 1
            async with asyncio.timeout(phase_timeout_s):
                await loop.wait_for(loop.phase_done(calls_per_phase))
    finally:
        loop.stopping = True
        await asyncio.gather(runner, return_exceptions=True)
    return figures


def offset_call(stub: pb_grpc.GRPCInferenceServiceStub, model: str) -> Callable[[], Awaitable[int]]:
    """One call to a model of meshserve.devkit.versioned: the version that answered,
    checked against what it computed (x + version)."""
    x = np.arange(OFFSET_WIDTH, dtype=np.float32).reshape(1, OFFSET_WIDTH)
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())

    async def call() -> int:
        response = await stub.ModelInfer(request, timeout=CALL_TIMEOUT_S)
        version = int(response.model_version)
        y = np.frombuffer(response.raw_output_contents[0], dtype=np.float32)
        assert np.array_equal(y, x.ravel() + version), f"version {version} answered {y.tolist()}"
        return version

    return call


# ------------------------------------------------------------------ the bench


async def warm_up(call: Callable[[], Awaitable[int]], duration_s: float) -> float:
    """The closed loop of ROLLOUT_CONCURRENCY for ``duration_s`` (at least 100 calls),
    unmeasured; the calls per second it got through."""
    started_s = time.perf_counter()
    done = 0

    async def caller() -> None:
        nonlocal done
        while time.perf_counter() - started_s < duration_s or done < 100:
            await call()
            done += 1

    await asyncio.gather(*(caller() for _ in range(ROLLOUT_CONCURRENCY)))
    return done / (time.perf_counter() - started_s)


def rollout_steps(router: mpb_grpc.RouterStub, model: str) -> list[Step]:
    """The bench's rollout by weights alone (both versions loaded from the start):
    steady on v1, v2 at 50%, v2 at 100% (v1 at weight 0), rolled back to v1."""

    def to(weights: dict[int, int]) -> Callable[[Callable[[], Awaitable[None]]], Awaitable[None]]:
        async def apply(drain: Callable[[], Awaitable[None]]) -> None:
            await router.SetTrafficSplit(mpb.TrafficSplit(model=model, weights=weights), timeout=CALL_TIMEOUT_S)
            await table_with(router, model, weights)

        return apply

    async def nothing(drain: Callable[[], Awaitable[None]]) -> None:
        return None

    return [
        Step("steady: v1", nothing, {1: 1.0}),
        Step("v2 at 50%", to({1: 1, 2: 1}), {1: 0.5, 2: 0.5}),
        Step("v2 at 100% (v1 at weight 0)", to({1: 0, 2: 1}), {2: 1.0}),
        Step("rolled back to v1", to({1: 1, 2: 0}), {1: 1.0}),
    ]


TABLE_SETTLE_S = 0.2
"""After the router's table carries a split, this long for the gateway's copy of the
same table (both streams are sent together) before calls count for the new phase."""


async def table_with(router: mpb_grpc.RouterStub, model: str, weights: Mapping[int, int]) -> None:
    """Until the router's routing table carries ``weights`` for ``model``, then TABLE_SETTLE_S."""
    stream = router.WatchRoutingTable(mpb.WatchRequest(gateway_id="bench-rollout"))
    try:
        async for table in stream:
            if any(s.model == model and dict(s.weights) == dict(weights) for s in table.splits):
                break
    finally:
        stream.cancel()
    await asyncio.sleep(TABLE_SETTLE_S)


def router_of(target: str) -> str:
    """The router address of the mesh this bench started: from its gateway's command line."""
    pid = gateway_pid(target)
    if pid is None:
        raise SystemExit("bench: rollout: cannot find the gateway process of the mesh to read its --router")
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return argv[argv.index("--router") + 1]


def run_rollout_bench(config: BenchConfig) -> dict[str, Any]:
    """``--scenario rollout``: a mesh of its own serving a two-version model; the closed
    loop at concurrency 16 through :func:`rollout_steps`, ``--duration-s`` worth of
    calls per phase at the rate of an unmeasured --warmup-s of the same loop."""
    if config.target:
        raise SystemExit("bench: --scenario rollout starts its own mesh (it changes the split): drop --target")
    with tempfile.TemporaryDirectory(prefix="meshserve-rollout-") as directory:
        root = Path(directory)
        write_versioned_model(root, ROLLOUT_MODEL, [1, 2], "traffic: {weights: {1: 1, 2: 0}}\n")
        with own_mesh(root) as target:
            return asyncio.run(_rollout(target, router_of(target), config))


async def _rollout(target: str, router_address: str, config: BenchConfig) -> dict[str, Any]:
    async with (
        grpc.aio.insecure_channel(target) as channel,
        grpc.aio.insecure_channel(router_address) as router_channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        call = offset_call(stub, ROLLOUT_MODEL)
        rate_per_s = await warm_up(call, config.warmup_s)
        calls_per_phase = max(200, int(rate_per_s * config.duration_s))  # about --duration-s per phase
        figures = await drive_rollout(
            call, rollout_steps(mpb_grpc.RouterStub(router_channel), ROLLOUT_MODEL), calls_per_phase=calls_per_phase
        )
    return {
        "model": {"name": ROLLOUT_MODEL, "version": "1 and 2", "max_batch_size": 32},
        "settings": asdict(config),
        "concurrency": ROLLOUT_CONCURRENCY,
        "calls_per_phase": calls_per_phase,
        "cores": os.cpu_count(),
        "rollout": figures.summary(),
    }
