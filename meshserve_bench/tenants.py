"""``--scenario noisy-neighbor``: does one tenant's flood reach another? (issue 3)

The scenario starts its own mesh with a temporary tenants file (random keys, stored
hashed) holding two standard-tier tenants on the one model: A, ``noisy``, limited to
``--noisy-limit-per-s``, and B, ``steady``, limited far above what it sends.

B sends open loop at ``--steady-rate-per-s`` on one channel and is timed in three phases:
alone; beside A sending exactly its limit (the load A is entitled to); and while A floods
at ``--flood-rate-per-s`` over ``--flood-channels`` connections. The middle phase splits
what the flood costs B into the share of the machine A may use anyway and what the
refused excess adds. A's flood runs in a process of its own, as another customer's
client would: on B's event loop its calls would delay B's client and show as B's latency.

The target: B's p99 under the flood within 1.5x of B's p99 alone, with no error for B.
A miss is reported, not an exit code: this is a measurement.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import multiprocessing
import secrets
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from meshserve.models.repository import ModelInfo
from meshserve.platform.heap import freeze_startup_heap
from meshserve.tenancy.tenants import hash_key
from meshserve_bench.config import BenchConfig
from meshserve_bench.load import (
    OK,
    REQUEST_TIMEOUT_S,
    LoadPoint,
    Metadata,
    Window,
    build_request,
    call,
    measure_point,
    open_channels,
    process_cpu_during,
)
from meshserve_bench.mesh import find_model, gateway_pid, model_json, own_mesh, progress
from meshserve_bench.scenarios import point_json
from protos import grpc_service_pb2 as pb

NOISY, STEADY = "noisy", "steady"
ALONE, AT_LIMIT, FLOODED = "alone", "at_limit", "flooded"  # the phases, in order
TARGET_P99_RATIO = 1.5
FLOOD_FACTOR = 10.0  # default flood rate, in multiples of A's limit
STEADY_HEADROOM = 10.0  # B's limit, in multiples of what it sends: B is never refused


@dataclass(frozen=True, slots=True)
class Flood:
    """How A sends: open loop at ``rate_per_s``, or (``rate_per_s`` 0) one closed-loop
    client per channel that pauses ``pause_after_refusal_s`` after each failed call."""

    rate_per_s: float
    channels: int
    pause_after_refusal_s: float = 0.0


@dataclass(frozen=True, slots=True)
class FloodPlan:
    """What A's process is to send: picklable, for the spawned process."""

    target: str
    request: bytes  # a serialized ModelInferRequest
    metadata: Metadata
    flood: Flood
    window: Window


@dataclass(frozen=True, slots=True)
class PhaseFigures:
    """B's calls in one phase, and A's when A sent any."""

    name: str  # ALONE, AT_LIMIT or FLOODED
    flood_rate_per_s: float
    steady: LoadPoint  # its machine_busy_s: every process, the mesh's and anyone else's
    flood: LoadPoint | None  # None when A sent nothing
    gateway_cpu_s: float | None = None  # the gateway process's CPU inside the window; None: unread


def refusals(figures: PhaseFigures) -> int:
    """A's calls refused RESOURCE_EXHAUSTED inside the phase's window."""
    return 0 if figures.flood is None else figures.flood.calls.errors.get("RESOURCE_EXHAUSTED", 0)


def admitted(figures: PhaseFigures) -> int:
    """Calls answered OK inside the phase's window, B's and A's."""
    return figures.steady.calls.ok + (0 if figures.flood is None else figures.flood.calls.ok)


def cpu_per_refusal_ms(base: PhaseFigures, loaded: PhaseFigures) -> float:
    """The gateway CPU a refusal costs, ms: ``loaded``'s gateway CPU less what its
    admitted calls cost at ``base``'s rate (CPU per OK call there, background
    included), over ``loaded``'s refusals. NaN when unread or nothing was refused."""
    if base.gateway_cpu_s is None or loaded.gateway_cpu_s is None or not refusals(loaded) or not admitted(base):
        return math.nan
    admitted_cpu_s = admitted(loaded) * base.gateway_cpu_s / admitted(base)
    return (loaded.gateway_cpu_s - admitted_cpu_s) / refusals(loaded) * 1000


def p99_ratio(base: PhaseFigures, other: PhaseFigures) -> float:
    """B's p99 in ``other`` over B's p99 in ``base``; NaN when either is missing."""
    if not base.steady.calls.p99_ms > 0 or math.isnan(other.steady.calls.p99_ms):
        return math.nan
    return other.steady.calls.p99_ms / base.steady.calls.p99_ms


def target_met(alone: PhaseFigures, flooded: PhaseFigures, ratio: float = TARGET_P99_RATIO) -> bool:
    """B's p99 under the flood within ``ratio`` of alone, and no error for B."""
    clean = not alone.steady.calls.errors and not flooded.steady.calls.errors
    return p99_ratio(alone, flooded) <= ratio and clean


def tenants_yaml(noisy_key: str, steady_key: str, config: BenchConfig) -> str:
    """The tenants file: only hashes of the keys, both tenants on ``config.model`` only."""

    def tenant(name: str, key: str, rate_per_s: float) -> dict[str, Any]:
        burst = max(1, math.ceil(rate_per_s))  # one second's worth
        limits = {"tier": "standard", "rate_per_s": rate_per_s, "burst": burst, "models": [config.model]}
        return {"name": name, "api_keys": [hash_key(key)], **limits}

    noisy = tenant(NOISY, noisy_key, config.noisy_limit_per_s)
    steady = tenant(STEADY, steady_key, config.steady_rate_per_s * STEADY_HEADROOM)
    return yaml.safe_dump({"tenants": [noisy, steady]}, sort_keys=False)


def warm_flooder() -> None:
    """Nothing to do: calling it in the flood process imports this module there (protos,
    gRPC) before the first phase, so that start-up is not timed."""


def flood_process(plan: FloodPlan) -> LoadPoint:
    """A's client, in its own process: open loop until the window ends, round-robin over
    ``plan.channels`` connections (the window's clock is the system's, shared by processes)."""
    request, flood = pb.ModelInferRequest.FromString(plan.request), plan.flood
    point = measure_point(
        plan.target,
        request,
        plan.window,
        channels=flood.channels,
        concurrency=flood.channels,
        rate_per_s=flood.rate_per_s,
        metadata=plan.metadata,
        pause_after_error_s=flood.pause_after_refusal_s,
    )
    return asyncio.run(point)


async def phase(
    name: str, target: str, model: ModelInfo, config: BenchConfig, keys: dict[str, str], flood: Flood | None
) -> PhaseFigures:
    """B timed for one window, and the gateway's CPU; A floods meanwhile from a spawned
    process when ``flood`` is given."""
    request, loop = build_request(model), asyncio.get_running_loop()
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no copy of this one's gRPC state
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as flooder:
        await loop.run_in_executor(flooder, warm_flooder)
        window = Window.after(config.warmup_s, config.duration_s)
        gateway_cpu = asyncio.create_task(process_cpu_during(window, gateway_pid(target)))
        flooding = None
        if flood is not None:
            plan = FloodPlan(target, request.SerializeToString(), bearer(keys[NOISY]), flood, window)
            flooding = loop.run_in_executor(flooder, flood_process, plan)
        steady = await measure_point(
            target, request, window, channels=1, rate_per_s=config.steady_rate_per_s, metadata=bearer(keys[STEADY])
        )
        flooded = await flooding if flooding is not None else None
        rate_per_s = 0.0 if flood is None else flood.rate_per_s
        return PhaseFigures(name, rate_per_s, steady, flooded, await gateway_cpu)


def bearer(key: str) -> Metadata:
    return (("authorization", f"Bearer {key}"),)


async def first_calls(target: str, model: ModelInfo, keys: dict[str, str]) -> None:
    """Fail fast, with the reason, when either tenant cannot call the model."""
    request = build_request(model)
    async with open_channels(target, 1) as (infer,):
        for name in (STEADY, NOISY):
            code, details = await call(infer, request, REQUEST_TIMEOUT_S, bearer(keys[name]))
            if code != OK:
                raise SystemExit(f"bench: tenant {name}: a first call to '{model.name}' failed: {code}: {details}")


async def measure(target: str, model: ModelInfo, config: BenchConfig, keys: dict[str, str]) -> list[PhaseFigures]:
    await first_calls(target, model, keys)
    freeze_startup_heap()  # the client's own GC pauses would show as B's latency
    channels = config.flood_channels
    floods = {
        ALONE: None,
        AT_LIMIT: Flood(config.noisy_limit_per_s, channels),
        FLOODED: Flood(config.flood_rate_per_s, channels),
    }
    return await run_phases(target, model, config, keys, floods)


async def run_phases(
    target: str, model: ModelInfo, config: BenchConfig, keys: dict[str, str], floods: dict[str, Flood | None]
) -> list[PhaseFigures]:
    """One phase per entry of ``floods``, in order, each with a line of progress."""
    phases = []
    for name, flood in floods.items():
        phases.append(figures := await phase(name, target, model, config, keys, flood))
        refused = refusals(figures) / figures.steady.duration_s
        progress(
            f"{name}: B p99 {figures.steady.calls.p99_ms:.2f} ms, errors {figures.steady.calls.errors or 0},"
            f" A refused {refused:.0f}/s, gateway CPU {figures.gateway_cpu_s} s"
        )
    return phases


def with_tenant_mesh(config: BenchConfig, measure_in: Callable[[str, ModelInfo, dict[str, str]], Any]) -> Any:
    """Start a mesh with tenants A and B (``tenants_yaml``) and call ``measure_in(target, model, keys)``."""
    if config.target:
        raise SystemExit(f"bench: --scenario {config.scenario} starts its own mesh (with its tenants): drop --target")
    model = find_model(config.repository, config.model)
    keys = {NOISY: secrets.token_urlsafe(32), STEADY: secrets.token_urlsafe(32)}
    with tempfile.TemporaryDirectory(prefix="meshserve-bench-") as directory:
        tenants_path = Path(directory) / "tenants.yaml"
        tenants_path.write_text(tenants_yaml(keys[NOISY], keys[STEADY], config))
        # No metrics servers: their worker ports (gateway's + 1 + i) are not checked free.
        with own_mesh(config.repository, ["--tenants", str(tenants_path), "--metrics-port", "0"]) as target:
            return measure_in(target, model, keys)


def run_noisy_neighbor(config: BenchConfig) -> dict[str, Any]:
    """Start a mesh with the two tenants, time B in each phase; every figure, as JSON."""
    phases = with_tenant_mesh(config, lambda target, model, keys: asyncio.run(measure(target, model, config, keys)))
    model = find_model(config.repository, config.model)
    return {"settings": asdict(config), "model": model_json(model), **noisy_neighbor_json(phases)}


def phase_json(figures: PhaseFigures) -> dict[str, Any]:
    flood = None if figures.flood is None else point_json(figures.flood, None)
    return {
        "flood_rate_per_s": figures.flood_rate_per_s,
        "steady": point_json(figures.steady, None),
        "flood": flood,
        "gateway_cpu_s": figures.gateway_cpu_s,
        "refused_per_s": refusals(figures) / figures.steady.duration_s,
    }


def noisy_neighbor_json(phases: list[PhaseFigures]) -> dict[str, Any]:
    by_name = {figures.name: figures for figures in phases}
    alone, flooded = by_name[ALONE], by_name[FLOODED]
    return {
        "phases": {name: phase_json(figures) for name, figures in by_name.items()},
        "p99_ratio": p99_ratio(alone, flooded),
        "at_limit_p99_ratio": p99_ratio(alone, by_name[AT_LIMIT]) if AT_LIMIT in by_name else None,
        "target_p99_ratio": TARGET_P99_RATIO,
        "target_met": target_met(alone, flooded),
        "gateway_cpu_per_refusal_ms": cpu_per_refusal_ms(alone, flooded),
    }
