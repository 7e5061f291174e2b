"""``--scenario retry-storm``: does a tenant retrying its refusals reach another? (issue 17)

The mesh and tenants of ``noisy-neighbor`` (:mod:`meshserve_bench.tenants`): A limited
to ``--noisy-limit-per-s``, B far above what it sends. B sends open loop at
``--steady-rate-per-s`` (40/s by default here), timed twice: alone, and while A, from a
process of its own, runs ``--storm-connections`` closed-loop clients that each call
again ``--storm-pause-ms`` after a refusal (at once after a success) -- a client that
retries as fast as its refusals come back. What A's refusals cost is what the gateway
spends on each: reported per refusal, from the gateway process's CPU.

The target: B's p99 under the storm within 2x of alone, and no error for B. A miss is
reported, not an exit code: this is a measurement.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any

from meshserve.models.repository import ModelInfo
from meshserve.platform.heap import freeze_startup_heap
from meshserve_bench.config import BenchConfig
from meshserve_bench.mesh import find_model, model_json
from meshserve_bench.tenants import (
    ALONE,
    Flood,
    PhaseFigures,
    cpu_per_refusal_ms,
    first_calls,
    p99_ratio,
    phase_json,
    refusals,
    run_phases,
    target_met,
    with_tenant_mesh,
)

STORM = "storm"  # the phase beside ALONE
TARGET_P99_RATIO = 2.0


async def measure(target: str, model: ModelInfo, config: BenchConfig, keys: dict[str, str]) -> list[PhaseFigures]:
    await first_calls(target, model, keys)
    freeze_startup_heap()  # the client's own GC pauses would show as B's latency
    storm = Flood(0.0, config.storm_connections, config.storm_pause_ms / 1000)
    return await run_phases(target, model, config, keys, {ALONE: None, STORM: storm})


def run_retry_storm(config: BenchConfig) -> dict[str, Any]:
    """Start a mesh with the two tenants, time B alone and under A's storm; every figure, as JSON."""
    phases = with_tenant_mesh(config, lambda target, model, keys: asyncio.run(measure(target, model, config, keys)))
    model = find_model(config.repository, config.model)
    return {"settings": asdict(config), "model": model_json(model), **retry_storm_json(phases)}


def retry_storm_json(phases: list[PhaseFigures]) -> dict[str, Any]:
    by_name = {figures.name: figures for figures in phases}
    alone, storm = by_name[ALONE], by_name[STORM]
    return {
        "phases": {name: phase_json(figures) for name, figures in by_name.items()},
        "p99_alone_ms": alone.steady.calls.p99_ms,
        "p99_storm_ms": storm.steady.calls.p99_ms,
        "p99_ratio": p99_ratio(alone, storm),
        "b_errors": storm.steady.calls.errors,
        "a_refused_per_s": refusals(storm) / storm.steady.duration_s,
        "gateway_cpu_per_refusal_ms": cpu_per_refusal_ms(alone, storm),
        "target_p99_ratio": TARGET_P99_RATIO,
        "target_met": target_met(alone, storm, TARGET_P99_RATIO),
    }
