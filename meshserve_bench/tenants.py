"""``meshserve bench --scenario noisy-neighbor``: does one tenant's flood reach another? (issue 3)

The scenario starts its own mesh with a temporary tenants file (random keys, stored
hashed) holding two standard-tier tenants allowed on the one model: A, ``noisy``, limited
to ``--noisy-limit-per-s``, and B, ``steady``, limited far above what it sends.

B sends open loop at ``--steady-rate-per-s`` (uniform spacing, batch 1, one channel) and
is timed for ``--duration-s`` in three phases: alone; beside A sending exactly its
limit (the load A is entitled to, nothing refused); and while A floods open loop at
``--flood-rate-per-s`` (default: ten times its limit) round-robin over
``--flood-channels`` TCP connections. The middle phase splits what the flood costs B
into the share of the machine A may use anyway and what the refused excess adds.
Each phase starts with ``--warmup-s``; a call counts
when it completes inside the window. B's latency runs from the start of its call; B's
send lag (how late the client started a call against its schedule) tells a busy client
from a slow mesh. Both tenants' requests are built once and reused. A's flood runs in a
process of its own, as another customer's client would: sharing B's event loop, its
400 calls a second delayed B's own client and showed as B's latency. Each client's
CPU and B's send lag are reported so a busy client shows.

The target (issue 3): B's p99 under the flood within 1.5x of B's p99 alone, with no
error for B. A miss is printed, not an exit code: this is a measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import itertools
import json
import math
import multiprocessing
import os
import platform
import secrets
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import yaml

from meshserve.models.repository import ModelInfo
from meshserve.platform.heap import freeze_startup_heap
from meshserve.settings import env_default
from meshserve.tenancy.tenants import hash_key
from meshserve_bench.display import progress_bar
from meshserve_bench.sweep import (
    _CHANNEL_OPTIONS,
    CONNECT_TIMEOUT_S,
    REQUEST_TIMEOUT_S,
    _cpu_s,
    _exit_on_sigterm,
    _find_model,
    _machine_busy_s,
    _progress,
    _sleep_until,
    _Tally,
    _Window,
    build_request,
    own_mesh,
    percentile_ms,
)

if TYPE_CHECKING:
    from protos import grpc_service_pb2 as pb

NOISY, STEADY = "noisy", "steady"
ALONE, AT_LIMIT, FLOODED = "alone", "A at its limit", "under flood"  # the phases, in order
TARGET_P99_RATIO = 1.5
FLOOD_FACTOR = 10.0  # default flood rate, in multiples of A's limit
STEADY_HEADROOM = 10.0  # B's limit, in multiples of what it sends: B is never refused
OK, RESOURCE_EXHAUSTED = "OK", "RESOURCE_EXHAUSTED"  # gRPC status code names
_Call = Callable[[], Coroutine[Any, Any, None]]


@dataclass(frozen=True, slots=True)
class ScenarioConfig:
    """The scenario's settings, from ``meshserve bench`` flags."""

    model: str
    duration_s: float
    warmup_s: float
    steady_rate_per_s: float  # what B sends
    noisy_limit_per_s: float  # A's rate limit (and burst)
    flood_rate_per_s: float  # what A sends
    flood_channels: int
    json_path: Path | None
    repository: Path


@dataclass(frozen=True, slots=True)
class PhaseFigures:
    """One phase of B's load, beside what A sends then, over ``duration_s`` of wall time."""

    name: str  # ALONE, AT_LIMIT or FLOODED
    duration_s: float
    steady_ok: int
    steady_p50_ms: float
    steady_p99_ms: float
    steady_errors: dict[str, int]  # gRPC status code name -> count
    steady_send_lag_p99_ms: float
    flood_codes: dict[str, int]  # gRPC status code name -> count; "OK" is accepted
    error_details: dict[str, str]  # the first details seen per code other than OK and RESOURCE_EXHAUSTED
    client_cpu_s: float  # B's client (this process), gRPC threads included
    flood_client_cpu_s: float  # A's client process
    machine_busy_s: float | None  # every process: this one, the mesh, and anyone else's; None off Linux


def p99_ratio(base: PhaseFigures, other: PhaseFigures) -> float:
    """B's p99 in ``other`` over B's p99 in ``base`` (alone, for the target); NaN when either is missing."""
    if not base.steady_p99_ms > 0 or math.isnan(other.steady_p99_ms):
        return math.nan
    return other.steady_p99_ms / base.steady_p99_ms


def target_met(alone: PhaseFigures, flooded: PhaseFigures) -> bool:
    ratio = p99_ratio(alone, flooded)
    return ratio <= TARGET_P99_RATIO and not alone.steady_errors and not flooded.steady_errors


def tenants_yaml(noisy_key: str, steady_key: str, config: ScenarioConfig) -> str:
    """The tenants file: only hashes of the keys, both tenants on ``config.model`` only."""

    def tenant(name: str, key: str, rate_per_s: float) -> dict[str, Any]:
        burst = max(1, math.ceil(rate_per_s))  # one second's worth
        fields = {"api_keys": [hash_key(key)], "tier": "standard", "rate_per_s": rate_per_s, "burst": burst}
        return {"name": name, **fields, "models": [config.model]}

    noisy = tenant(NOISY, noisy_key, config.noisy_limit_per_s)
    steady = tenant(STEADY, steady_key, config.steady_rate_per_s * STEADY_HEADROOM)
    return yaml.safe_dump({"tenants": [noisy, steady]}, sort_keys=False)


# ------------------------------------------------------------------ load


async def _call(infer: Any, request: pb.ModelInferRequest, metadata: Sequence[tuple[str, str]]) -> tuple[str, str]:
    """One ModelInfer; the gRPC status code name ("OK" on success) and details."""
    try:
        await infer(request, metadata=metadata, timeout=REQUEST_TIMEOUT_S)
    except grpc.aio.AioRpcError as exc:
        return str(exc.code().name), str(exc.details())
    return OK, ""


def due_times_ns(first_ns: int, rate_per_s: float, end_ns: int) -> Iterator[int]:
    """The open-loop schedule: ``first_ns`` then every 1/``rate_per_s`` s, before ``end_ns``.

    Each time is computed from the first (no drift from rounding).
    """
    for index in itertools.count():
        due_ns = first_ns + round(index * 1e9 / rate_per_s)
        if due_ns >= end_ns:
            return
        yield due_ns


async def _open_loop(group: asyncio.TaskGroup, call: _Call, rate_per_s: float, window: _Window) -> list[int]:
    """Start ``call()`` every 1/``rate_per_s`` s until the window ends, never waiting for
    one to finish; a late start is not skipped. The send lag of each start inside the window, ns."""
    lags_ns: list[int] = []
    for due_ns in due_times_ns(time.perf_counter_ns(), rate_per_s, window.end_ns):
        await _sleep_until(due_ns)
        group.create_task(call())
        if due_ns >= window.start_ns:
            lags_ns.append(time.perf_counter_ns() - due_ns)
    return lags_ns


async def _usage_during(window: _Window) -> tuple[float, float | None]:
    """CPU seconds of this process, and busy seconds of the machine, inside ``window``."""
    await _sleep_until(window.start_ns)
    cpu_before_s, busy_before_s = _cpu_s(), _machine_busy_s()
    await _sleep_until(window.end_ns)
    cpu_s, busy_after_s = _cpu_s() - cpu_before_s, _machine_busy_s()
    return cpu_s, None if busy_before_s is None or busy_after_s is None else busy_after_s - busy_before_s


@dataclass(frozen=True, slots=True)
class _Clients:
    """B's stub and both tenants' metadata, opened once for every phase; A's flood
    runs in ``flooder``, a process of its own."""

    target: str
    request: pb.ModelInferRequest
    steady: Any  # ModelInfer on B's channel
    steady_metadata: tuple[tuple[str, str], ...]
    flood_metadata: tuple[tuple[str, str], ...]
    flood_channels: int
    flooder: concurrent.futures.ProcessPoolExecutor


@dataclass(frozen=True, slots=True)
class _FloodFigures:
    codes: dict[str, int]
    details: dict[str, str]
    cpu_s: float


def _warm_flooder() -> None:
    """Imports in the flood process before the first phase, so its start-up is not timed."""
    from protos import grpc_service_pb2_grpc  # noqa: F401


@dataclass(frozen=True, slots=True)
class _FloodPlan:
    """What A's process is to send: picklable, for the spawned process."""

    target: str
    request: bytes  # a serialized ModelInferRequest
    metadata: tuple[tuple[str, str], ...]
    rate_per_s: float
    channels: int
    window: _Window


def _flood_process(plan: _FloodPlan) -> _FloodFigures:
    """A's client, in its own process: open loop at ``plan.rate_per_s`` round-robin
    over ``plan.channels`` connections until the window ends (``perf_counter_ns`` is
    the system's monotonic clock, shared by both processes)."""
    return asyncio.run(_flood(plan))


async def _flood(plan: _FloodPlan) -> _FloodFigures:
    from protos import grpc_service_pb2 as pb
    from protos import grpc_service_pb2_grpc as pb_grpc

    message = pb.ModelInferRequest.FromString(plan.request)
    window = plan.window
    opened = [grpc.aio.insecure_channel(plan.target, options=_CHANNEL_OPTIONS) for _ in range(plan.channels)]
    codes, details = Counter[str](), dict[str, str]()
    try:
        infers = itertools.cycle([pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer for channel in opened])

        async def flood_call() -> None:
            code, text = await _call(next(infers), message, plan.metadata)
            if window.start_ns <= time.perf_counter_ns() <= window.end_ns:
                codes[code] += 1
                if code not in (OK, RESOURCE_EXHAUSTED):
                    details.setdefault(code, text)

        async with asyncio.timeout((window.end_ns - time.perf_counter_ns()) / 1e9 + REQUEST_TIMEOUT_S):
            async with asyncio.TaskGroup() as group:
                group.create_task(_open_loop(group, flood_call, plan.rate_per_s, window))
                cpu_s, _ = await _usage_during(window)
    finally:
        await asyncio.gather(*(channel.close() for channel in opened))
    return _FloodFigures(dict(codes), details, cpu_s)


async def _phase(clients: _Clients, config: ScenarioConfig, name: str, flood_rate_per_s: float) -> PhaseFigures:
    start_ns = time.perf_counter_ns() + int(config.warmup_s * 1e9)
    window = _Window(start_ns, start_ns + int(config.duration_s * 1e9))
    steady, details = _Tally(), dict[str, str]()

    async def steady_call() -> None:
        begin_ns = time.perf_counter_ns()
        code, text = await _call(clients.steady, clients.request, clients.steady_metadata)
        if window.start_ns <= (end_ns := time.perf_counter_ns()) <= window.end_ns:
            if code == OK:
                steady.latencies_ns.append(end_ns - begin_ns)
            else:
                steady.errors[code] += 1
                details.setdefault(code, text)

    flood: asyncio.Future[_FloodFigures] | None = None
    if flood_rate_per_s > 0:
        plan = _FloodPlan(
            clients.target,
            clients.request.SerializeToString(),
            clients.flood_metadata,
            flood_rate_per_s,
            clients.flood_channels,
            window,
        )
        flood = asyncio.get_running_loop().run_in_executor(clients.flooder, _flood_process, plan)
    async with asyncio.timeout(config.warmup_s + config.duration_s + REQUEST_TIMEOUT_S + CONNECT_TIMEOUT_S):
        async with asyncio.TaskGroup() as group:
            sender = group.create_task(_open_loop(group, steady_call, config.steady_rate_per_s, window))
            cpu_s, busy_s = await _usage_during(window)
        flooded = await flood if flood is not None else _FloodFigures({}, {}, 0.0)
    latencies_ns = steady.latencies_ns
    return PhaseFigures(
        name=name,
        duration_s=config.duration_s,
        steady_ok=len(latencies_ns),
        steady_p50_ms=percentile_ms(latencies_ns, 50),
        steady_p99_ms=percentile_ms(latencies_ns, 99),
        steady_errors=dict(steady.errors),
        steady_send_lag_p99_ms=percentile_ms(sender.result(), 99),
        flood_codes=flooded.codes,
        error_details={**flooded.details, **details},
        client_cpu_s=cpu_s,
        flood_client_cpu_s=flooded.cpu_s,
        machine_busy_s=busy_s,
    )


async def measure(target: str, model: ModelInfo, config: ScenarioConfig, keys: dict[str, str]) -> list[PhaseFigures]:
    """B alone, beside A at its limit, then under A's flood, on channels opened once."""
    from protos import grpc_service_pb2_grpc as pb_grpc

    channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no copy of this one's gRPC state
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as flooder:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await channel.channel_ready()
            await asyncio.get_running_loop().run_in_executor(flooder, _warm_flooder)
            clients = _Clients(
                target=target,
                request=build_request(model),
                steady=pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer,
                steady_metadata=(("authorization", f"Bearer {keys[STEADY]}"),),
                flood_metadata=(("authorization", f"Bearer {keys[NOISY]}"),),
                flood_channels=config.flood_channels,
                flooder=flooder,
            )
            for name, metadata in ((STEADY, clients.steady_metadata), (NOISY, clients.flood_metadata)):
                code, text = await _call(clients.steady, clients.request, metadata)
                if code != OK:
                    raise SystemExit(f"bench: tenant {name}: a first call to '{model.name}' failed: {code}: {text}")
            freeze_startup_heap()  # the client's own GC pauses would show as B's latency
            phases = []
            rates = {ALONE: 0.0, AT_LIMIT: config.noisy_limit_per_s, FLOODED: config.flood_rate_per_s}
            for name, rate in rates.items():
                phase = await _phase(clients, config, name, rate)
                _progress(_steady_text(phase) + (f"; tenant A {phase.flood_codes}" if rate else ""))
                phases.append(phase)
            return phases
        finally:
            await channel.close()


# ------------------------------------------------------------------ report


def _steady_text(phase: PhaseFigures) -> str:
    errors = ", ".join(f"{code} {count}" for code, count in sorted(phase.steady_errors.items())) or "0"
    return f"{phase.name} p50 {phase.steady_p50_ms:.2f} ms p99 {phase.steady_p99_ms:.2f} ms, errors {errors}"


def _cores_text(phase: PhaseFigures) -> str:
    busy = "" if phase.machine_busy_s is None else f", machine busy {phase.machine_busy_s / phase.duration_s:.2f}"
    return (
        f"client cpu B {phase.client_cpu_s / phase.duration_s:.2f}"
        f" A {phase.flood_client_cpu_s / phase.duration_s:.2f}{busy},"
        f" B send lag p99 {phase.steady_send_lag_p99_ms:.2f} ms"
    )


def format_report(
    config: ScenarioConfig,
    machine: dict[str, Any],
    alone: PhaseFigures,
    flooded: PhaseFigures,
    at_limit: PhaseFigures | None = None,
) -> str:
    """The plain-text lines printed at the end of a run."""
    codes = Counter(flooded.flood_codes)
    accepted, rejected = codes.pop(OK, 0), codes.pop(RESOURCE_EXHAUSTED, 0)
    other = ", ".join(f"{code} {count}" for code, count in sorted(codes.items())) or "0"
    ratio = p99_ratio(alone, flooded)
    lines = [
        f"noisy-neighbor, model {config.model}, {config.duration_s:g} s per phase,"
        f" machine: {machine['cores']} cores, load average {machine['load_average_1m']:.2f} at start",
        f"tenant B (steady {config.steady_rate_per_s:g}/s): {_steady_text(alone)} | {_steady_text(flooded)}"
        f" | p99 ratio {ratio:.2f}x (target <= {TARGET_P99_RATIO:g}x)",
        f"tenant A (limit {config.noisy_limit_per_s:g}/s, sending {config.flood_rate_per_s:g}/s):"
        f" accepted {accepted} ({accepted / config.duration_s:.1f}/s), rejected {rejected} (RESOURCE_EXHAUSTED),"
        f" other {other}",
        f"cores: alone {_cores_text(alone)} | under flood {_cores_text(flooded)}",
    ]
    if at_limit is not None:
        lines.append(
            f"reference: B beside A sending only its limit ({config.noisy_limit_per_s:g}/s): {_steady_text(at_limit)}"
            f" | p99 ratio to alone {p99_ratio(alone, at_limit):.2f}x; the refused excess adds"
            f" {p99_ratio(at_limit, flooded):.2f}x on top"
        )
    for phase in (p for p in (alone, at_limit, flooded) if p is not None):
        for code, text in sorted(phase.error_details.items()):
            lines.append(f"{phase.name}: first {code}: {text}")
    if target_met(alone, flooded):
        lines.append("target met")
    else:
        lines.append(f"target missed: B's p99 ratio {ratio:.2f}x (<= {TARGET_P99_RATIO:g}x) and no error for B")
    return "\n".join(lines)


def report_json(
    config: ScenarioConfig,
    machine: dict[str, Any],
    alone: PhaseFigures,
    flooded: PhaseFigures,
    at_limit: PhaseFigures | None = None,
) -> dict[str, Any]:
    """Every figure of the run, for ``--json``."""
    phases = {"alone": asdict(alone), "flooded": asdict(flooded)}
    if at_limit is not None:
        phases["at_limit"] = asdict(at_limit)
    return {
        "scenario": "noisy-neighbor",
        "settings": asdict(config),
        "machine": machine,
        "phases": phases,
        "p99_ratio": p99_ratio(alone, flooded),
        "target_p99_ratio": TARGET_P99_RATIO,
        "target_met": target_met(alone, flooded),
    }


# ------------------------------------------------------------------ entry points


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("noisy-neighbor scenario", "always starts its own mesh (no --target)")
    group.add_argument(
        "--steady-rate-per-s",
        type=float,
        default=env_default("BENCH_STEADY_RATE_PER_S", 50.0),
        help="what tenant B sends",
    )
    group.add_argument(
        "--noisy-limit-per-s",
        type=float,
        default=env_default("BENCH_NOISY_LIMIT_PER_S", 40.0),
        help="tenant A's rate limit",
    )
    group.add_argument(
        "--flood-rate-per-s",
        type=float,
        default=env_default("BENCH_FLOOD_RATE_PER_S", None),
        help=f"what tenant A sends (default: {FLOOD_FACTOR:g}x its limit)",
    )
    group.add_argument(
        "--flood-channels", type=int, default=env_default("BENCH_FLOOD_CHANNELS", 8), help="A's connections"
    )


def scenario_config(args: argparse.Namespace) -> ScenarioConfig:
    from meshserve.devkit.examples import default_repository_dir, write_example_repository

    if args.target:
        raise SystemExit("bench: --scenario noisy-neighbor starts its own mesh (with its tenants): drop --target")
    rates = (args.steady_rate_per_s, args.noisy_limit_per_s, args.flood_rate_per_s or 1.0, args.duration_s)
    if min(rates) <= 0 or args.flood_channels < 1:
        raise SystemExit("bench: rates and --duration-s must be > 0, --flood-channels >= 1")
    repository = Path(args.model_repository) if args.model_repository else None
    return ScenarioConfig(
        model=args.model,
        duration_s=args.duration_s,
        warmup_s=args.warmup_s,
        steady_rate_per_s=args.steady_rate_per_s,
        noisy_limit_per_s=args.noisy_limit_per_s,
        flood_rate_per_s=args.flood_rate_per_s or FLOOD_FACTOR * args.noisy_limit_per_s,
        flood_channels=args.flood_channels,
        json_path=Path(args.json) if args.json else None,
        repository=repository or write_example_repository(default_repository_dir()),
    )


def run_noisy_neighbor(args: argparse.Namespace) -> int:
    """Start a mesh with two tenants, time B alone, beside A at its limit and under A's flood, print the lines.

    Returns 0 whether or not the target is met.
    """
    config = scenario_config(args)
    model = _find_model(config.repository, config.model)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    machine = {
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_1m": os.getloadavg()[0],
    }
    keys = {NOISY: secrets.token_urlsafe(32), STEADY: secrets.token_urlsafe(32)}
    with tempfile.TemporaryDirectory(prefix="meshserve-bench-") as directory:
        tenants_path = Path(directory) / "tenants.yaml"
        tenants_path.write_text(tenants_yaml(keys[NOISY], keys[STEADY], config))
        # A later --metrics-port wins: no metrics servers, whose worker ports (gateway's + 1 + i)
        # are not checked free and can collide with another process's port.
        up_args = ["--tenants", str(tenants_path), "--metrics-port", "0"]
        with own_mesh(config.repository, up_args) as target:
            _progress(f"3 phases: about {3 * (config.warmup_s + config.duration_s):.0f} s")
            with progress_bar("bench noisy-neighbor", 3 * (config.warmup_s + config.duration_s)):
                alone, at_limit, flooded = asyncio.run(measure(target, model, config, keys))
    print(format_report(config, machine, alone, flooded, at_limit), flush=True)
    if config.json_path is not None:
        report = report_json(config, machine, alone, flooded, at_limit)
        config.json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0
