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
)
from meshserve_bench.mesh import find_model, model_json, own_mesh, progress
from meshserve_bench.scenarios import point_json
from protos import grpc_service_pb2 as pb

NOISY, STEADY = "noisy", "steady"
ALONE, AT_LIMIT, FLOODED = "alone", "at_limit", "flooded"  # the phases, in order
TARGET_P99_RATIO = 1.5
FLOOD_FACTOR = 10.0  # default flood rate, in multiples of A's limit
STEADY_HEADROOM = 10.0  # B's limit, in multiples of what it sends: B is never refused


@dataclass(frozen=True, slots=True)
class FloodPlan:
    """What A's process is to send: picklable, for the spawned process."""

    target: str
    request: bytes  # a serialized ModelInferRequest
    metadata: Metadata
    rate_per_s: float
    channels: int
    window: Window


@dataclass(frozen=True, slots=True)
class PhaseFigures:
    """B's calls in one phase, and A's when A sent any."""

    name: str  # ALONE, AT_LIMIT or FLOODED
    flood_rate_per_s: float
    steady: LoadPoint  # its machine_busy_s: every process, the mesh's and anyone else's
    flood: LoadPoint | None  # None when A sent nothing


def p99_ratio(base: PhaseFigures, other: PhaseFigures) -> float:
    """B's p99 in ``other`` over B's p99 in ``base``; NaN when either is missing."""
    if not base.steady.calls.p99_ms > 0 or math.isnan(other.steady.calls.p99_ms):
        return math.nan
    return other.steady.calls.p99_ms / base.steady.calls.p99_ms


def target_met(alone: PhaseFigures, flooded: PhaseFigures) -> bool:
    """B's p99 under the flood within ``TARGET_P99_RATIO`` of alone, and no error for B."""
    clean = not alone.steady.calls.errors and not flooded.steady.calls.errors
    return p99_ratio(alone, flooded) <= TARGET_P99_RATIO and clean


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
    request = pb.ModelInferRequest.FromString(plan.request)
    point = measure_point(
        plan.target, request, plan.window, channels=plan.channels, rate_per_s=plan.rate_per_s, metadata=plan.metadata
    )
    return asyncio.run(point)


async def phase(
    name: str, target: str, model: ModelInfo, config: BenchConfig, keys: dict[str, str], flood_rate_per_s: float
) -> PhaseFigures:
    """B timed for one window; A floods meanwhile from a spawned process when ``flood_rate_per_s`` > 0."""
    request, loop = build_request(model), asyncio.get_running_loop()
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no copy of this one's gRPC state
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as flooder:
        await loop.run_in_executor(flooder, warm_flooder)
        window = Window.after(config.warmup_s, config.duration_s)
        flooding = None
        if flood_rate_per_s > 0:
            serialized, channels = request.SerializeToString(), config.flood_channels
            plan = FloodPlan(target, serialized, bearer(keys[NOISY]), flood_rate_per_s, channels, window)
            flooding = loop.run_in_executor(flooder, flood_process, plan)
        steady = await measure_point(
            target, request, window, channels=1, rate_per_s=config.steady_rate_per_s, metadata=bearer(keys[STEADY])
        )
        return PhaseFigures(name, flood_rate_per_s, steady, await flooding if flooding is not None else None)


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
    phases = []
    rates = {ALONE: 0.0, AT_LIMIT: config.noisy_limit_per_s, FLOODED: config.flood_rate_per_s}
    for name, rate in rates.items():
        phases.append(figures := await phase(name, target, model, config, keys, rate))
        progress(f"{name}: B p99 {figures.steady.calls.p99_ms:.2f} ms, errors {figures.steady.calls.errors or 0}")
    return phases


def run_noisy_neighbor(config: BenchConfig) -> dict[str, Any]:
    """Start a mesh with the two tenants, time B in each phase; every figure, as JSON."""
    if config.target:
        raise SystemExit("bench: --scenario noisy-neighbor starts its own mesh (with its tenants): drop --target")
    model = find_model(config.repository, config.model)
    keys = {NOISY: secrets.token_urlsafe(32), STEADY: secrets.token_urlsafe(32)}
    with tempfile.TemporaryDirectory(prefix="meshserve-bench-") as directory:
        tenants_path = Path(directory) / "tenants.yaml"
        tenants_path.write_text(tenants_yaml(keys[NOISY], keys[STEADY], config))
        # No metrics servers: their worker ports (gateway's + 1 + i) are not checked free.
        with own_mesh(config.repository, ["--tenants", str(tenants_path), "--metrics-port", "0"]) as target:
            phases = asyncio.run(measure(target, model, config, keys))
    return {"settings": asdict(config), "model": model_json(model), **noisy_neighbor_json(phases)}


def phase_json(figures: PhaseFigures) -> dict[str, Any]:
    flood = None if figures.flood is None else point_json(figures.flood, None)
    return {"flood_rate_per_s": figures.flood_rate_per_s, "steady": point_json(figures.steady, None), "flood": flood}


def noisy_neighbor_json(phases: list[PhaseFigures]) -> dict[str, Any]:
    by_name = {figures.name: figures for figures in phases}
    alone, flooded = by_name[ALONE], by_name[FLOODED]
    return {
        "phases": {name: phase_json(figures) for name, figures in by_name.items()},
        "p99_ratio": p99_ratio(alone, flooded),
        "at_limit_p99_ratio": p99_ratio(alone, by_name[AT_LIMIT]) if AT_LIMIT in by_name else None,
        "target_p99_ratio": TARGET_P99_RATIO,
        "target_met": target_met(alone, flooded),
    }
