"""``meshserve bench`` scenarios beyond one model's closed-loop sweep.

``--scenario open-loop --rates 50,100,200``: calls start every 1/rate s (uniform
spacing), whether or not earlier ones returned, each with ``--request-timeout-s`` as its
gRPC timeout. Per rate: what was sent per second, OK calls per second and their p50 and
p99, errors by status code, and the send lag (how late the client started a call
against its schedule: a busy client, not a slow mesh). Raw ONNX Runtime's batch-1
latency is measured first per model, for the added latency.

``--models cnn,mlp`` (sweep and open-loop): one batch-1 request per model, built once;
calls take the models in turn (round-robin), and figures come per model and overall.
A sweep over several models measures raw ONNX Runtime per model; its overall row is
set against the equal mix's raw capacity (the harmonic mean of each model's best).

``--scenario overload``: a short closed-loop run at concurrency 32 finds the sustainable
rate; the open loop then sends twice that for ``--duration-s``, each call with
``--request-timeout-s`` as its deadline. Accepted calls must answer within the deadline,
the excess must be shed (RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED, nothing else), and the
mesh's memory (VmRSS of the processes this bench started, from /proc) must stay flat.
Against ``--target`` the mesh's processes are not ours and RSS is not measured.

A call counts when it completes inside the measured window, after ``--warmup-s``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from meshserve.models.repository import ModelInfo
from meshserve.platform.heap import freeze_startup_heap
from meshserve.settings import env_default
from meshserve_bench.display import progress_bar, require_matplotlib
from meshserve_bench.sweep import (
    _CHANNEL_OPTIONS,
    CONNECT_TIMEOUT_S,
    MAX_DEFAULT_CHANNELS,
    REQUEST_TIMEOUT_S,
    BenchConfig,
    RawFigures,
    _cpu_s_during,
    _progress,
    _sleep_until,
    _Tally,
    _Window,
    build_request,
    measure_raw_with_noise,
    percentile_ms,
    raw_batches,
)
from meshserve_bench.tenants import _open_loop

if TYPE_CHECKING:
    from protos import grpc_service_pb2 as pb

ALL = "all"  # the row of every model together
CLIENT_LAG_SHARE = 0.1
"""An open loop whose send lag p99 passes this share of the deadline is client-bound."""

PROBE_CONCURRENCY = 32
PROBE_DURATION_S = 3.0  # at most; --duration-s when shorter
OVERLOAD_FACTOR = 2.0
SHED_CODES = ("RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED")
RSS_FLAT_GROWTH = 0.10  # end RSS over start RSS, minus one, that still counts as flat


@dataclass(frozen=True, slots=True)
class ScenarioConfig:
    """``meshserve bench`` settings for these scenarios: the sweep's, and what they add."""

    bench: BenchConfig
    scenario: str  # "sweep", "open-loop" or "overload"
    models: tuple[str, ...]
    rates_per_s: tuple[float, ...]
    request_timeout_s: float  # every call's gRPC timeout; overload's deadline
    plot_path: Path | None


# ------------------------------------------------------------------ figures


@dataclass(frozen=True, slots=True)
class CallFigures:
    """Calls that completed inside one window, for one model or for all."""

    ok: int
    p50_ms: float  # of OK calls
    p99_ms: float
    errors: dict[str, int]  # gRPC status code name -> count
    error_p50_ms: float  # how long an error took to come back; NaN when none did


@dataclass(frozen=True, slots=True)
class LoadFigures:
    """One load point, a concurrency (closed loop) or a rate (open loop), over ``duration_s``."""

    offered: float  # clients, or calls per second
    duration_s: float
    overall: CallFigures
    by_model: dict[str, CallFigures]
    sent: int  # open loop: calls started inside the window; closed loop: calls answered
    send_lag_p99_ms: float  # NaN for closed loop
    client_cpu_s: float

    def ok_per_s(self, model: str = ALL) -> float:
        figures = self.overall if model == ALL else self.by_model[model]
        return figures.ok / self.duration_s


@dataclass(slots=True)
class _TimedTally(_Tally):
    """:class:`_Tally`, plus how long each error took to come back."""

    error_latencies_ns: list[int] = field(default_factory=list)


def call_figures(tally: _TimedTally) -> CallFigures:
    latencies_ns = tally.latencies_ns
    return CallFigures(
        ok=len(latencies_ns),
        p50_ms=percentile_ms(latencies_ns, 50),
        p99_ms=percentile_ms(latencies_ns, 99),
        errors=dict(tally.errors),
        error_p50_ms=percentile_ms(tally.error_latencies_ns, 50),
    )


def merge_tallies(tallies: Iterator[_TimedTally]) -> _TimedTally:
    """Every model's calls as one tally (percentiles of all, not averages of each)."""
    merged = _TimedTally()
    for tally in tallies:
        merged.latencies_ns.extend(tally.latencies_ns)
        merged.errors.update(tally.errors)
        merged.error_latencies_ns.extend(tally.error_latencies_ns)
    return merged


def load_figures(
    offered: float,
    duration_s: float,
    tallies: Mapping[str, _TimedTally],
    sends_lag_ns: Sequence[int] | None,
    cpu_s: float,
) -> LoadFigures:
    """Per-model and overall figures from each model's tally; ``sends_lag_ns`` is None for closed loop."""
    overall = call_figures(merge_tallies(iter(tallies.values())))
    sent = overall.ok + sum(overall.errors.values()) if sends_lag_ns is None else len(sends_lag_ns)
    lag_p99_ms = math.nan if sends_lag_ns is None else percentile_ms(sends_lag_ns, 99)
    by_model = {name: call_figures(tally) for name, tally in tallies.items()}
    return LoadFigures(offered, duration_s, overall, by_model, sent, lag_p99_ms, cpu_s)


def mix_capacity(raws: Mapping[str, RawFigures]) -> float:
    """Items/s raw ONNX Runtime serves of an equal mix of the models, each at its best batch."""
    return len(raws) / sum(1.0 / raw.best_items_per_s() for raw in raws.values())


# ------------------------------------------------------------------ load


@dataclass(frozen=True, slots=True)
class Connection:
    """ModelInfer on each open channel, and one request per model, built once."""

    infers: tuple[Any, ...]
    requests: dict[str, pb.ModelInferRequest]
    timeout_s: float


@contextlib.asynccontextmanager
async def connect(
    target: str, channels: int, requests: dict[str, pb.ModelInferRequest], timeout_s: float
) -> AsyncIterator[Connection]:
    """``channels`` TCP connections to ``target``, ready; closed on exit."""
    from protos import grpc_service_pb2_grpc as pb_grpc

    opened = [grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS) for _ in range(channels)]
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            await asyncio.gather(*(channel.channel_ready() for channel in opened))
        infers = tuple(pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer for channel in opened)
        yield Connection(infers, requests, timeout_s)
    finally:
        await asyncio.gather(*(channel.close() for channel in opened))


def window_after(warmup_s: float, duration_s: float) -> _Window:
    """The measured span: starts ``warmup_s`` from now."""
    start_ns = time.perf_counter_ns() + int(warmup_s * 1e9)
    return _Window(start_ns, start_ns + int(duration_s * 1e9))


async def _timed_call(
    infer: Any, request: pb.ModelInferRequest, timeout_s: float, window: _Window, tally: _TimedTally
) -> None:
    """One ModelInfer, counted in ``tally`` when it completes inside ``window``."""
    start_ns = time.perf_counter_ns()
    code = None
    try:
        await infer(request, timeout=timeout_s)
    except grpc.aio.AioRpcError as exc:
        code = str(exc.code().name)
    end_ns = time.perf_counter_ns()
    if not window.start_ns <= end_ns <= window.end_ns:
        return
    if code is None:
        tally.latencies_ns.append(end_ns - start_ns)
    else:
        tally.errors[code] += 1
        tally.error_latencies_ns.append(end_ns - start_ns)


def _bound_s(connection: Connection, window: _Window) -> float:
    """How long a point may take: its window, the last call's timeout, and slack."""
    return (window.end_ns - time.perf_counter_ns()) / 1e9 + connection.timeout_s + CONNECT_TIMEOUT_S


async def measure_closed(connection: Connection, concurrency: int, window: _Window) -> LoadFigures:
    """``concurrency`` closed-loop clients over the channels in turn; each call takes the next model."""
    tallies = {name: _TimedTally() for name in connection.requests}
    models = itertools.cycle(connection.requests.items())

    async def client(infer: Any) -> None:
        while time.perf_counter_ns() < window.end_ns:
            name, request = next(models)
            await _timed_call(infer, request, connection.timeout_s, window, tallies[name])

    async with asyncio.timeout(_bound_s(connection, window)):
        async with asyncio.TaskGroup() as group:
            for index in range(concurrency):
                group.create_task(client(connection.infers[index % len(connection.infers)]))
            cpu_s = await _cpu_s_during(window)
    return load_figures(concurrency, (window.end_ns - window.start_ns) / 1e9, tallies, None, cpu_s)


async def measure_open(connection: Connection, rate_per_s: float, window: _Window) -> LoadFigures:
    """Open loop at ``rate_per_s``: models and channels taken in turn, call by call."""
    tallies = {name: _TimedTally() for name in connection.requests}
    models, infers = itertools.cycle(connection.requests.items()), itertools.cycle(connection.infers)

    async def call() -> None:
        name, request = next(models)
        await _timed_call(next(infers), request, connection.timeout_s, window, tallies[name])

    async with asyncio.timeout(_bound_s(connection, window)):
        async with asyncio.TaskGroup() as group:
            sender = group.create_task(_open_loop(group, call, rate_per_s, window))
            cpu_s = await _cpu_s_during(window)
    return load_figures(rate_per_s, (window.end_ns - window.start_ns) / 1e9, tallies, sender.result(), cpu_s)


# ------------------------------------------------------------------ mesh memory


def _parent_pids() -> dict[int, int]:
    """pid -> parent pid of every process in /proc (those that vanish meanwhile are left out)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])  # the name may hold ")"
    return parents


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, theirs, ...), from /proc; [] off Linux."""
    if not Path("/proc/self/stat").exists():
        return []
    children: dict[int, list[int]] = {}
    for child, parent in _parent_pids().items():
        children.setdefault(parent, []).append(child)
    found, stack = [], list(children.get(pid, []))
    while stack:
        found.append(current := stack.pop())
        stack.extend(children.get(current, []))
    return sorted(found)


def rss_kib(pid: int) -> int | None:
    """VmRSS of ``pid`` in KiB (/proc/<pid>/status); None when it is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None  # a zombie has no VmRSS


def mesh_rss_kib(pids: Sequence[int]) -> int:
    """The summed VmRSS of ``pids`` that are still there, KiB."""
    return sum(kib for kib in map(rss_kib, pids) if kib is not None)


async def _rss_during(window: _Window, pids: Sequence[int]) -> tuple[int, int]:
    """The mesh's RSS at the window's start and end, KiB (processes started meanwhile count at the end)."""
    await _sleep_until(window.start_ns)
    start_kib = mesh_rss_kib(pids)
    await _sleep_until(window.end_ns)
    return start_kib, mesh_rss_kib(sorted({*pids, *descendants(os.getpid())}))


# ------------------------------------------------------------------ overload


@dataclass(frozen=True, slots=True)
class OverloadFigures:
    """The probe's sustainable rate, and what the mesh did with twice that."""

    sustainable_per_s: float  # OK calls/s of the closed-loop probe
    probe_duration_s: float
    deadline_ms: float
    load: LoadFigures  # the open loop at OVERLOAD_FACTOR x sustainable_per_s
    rss_start_kib: int | None  # None: not measured (--target)
    rss_end_kib: int | None

    def shed(self) -> dict[str, int]:
        """Errors by shed code; the rest under "other"."""
        errors = Counter(self.load.overall.errors)
        counts = {code: errors.pop(code, 0) for code in SHED_CODES}
        return {**counts, "other": sum(errors.values())}

    def rss_growth(self) -> float | None:
        if self.rss_start_kib is None or self.rss_end_kib is None or self.rss_start_kib == 0:
            return None
        return self.rss_end_kib / self.rss_start_kib - 1.0


def overload_problems(figures: OverloadFigures) -> list[str]:
    """Why the mesh failed overload; empty when accepted calls kept the deadline, the excess
    was shed as RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED and memory stayed flat."""
    problems = []
    overall = figures.load.overall
    if overall.ok == 0:
        problems.append("no call was accepted")
    elif not overall.p99_ms <= figures.deadline_ms:
        problem = f"accepted p99 {overall.p99_ms:.1f} ms is past the {figures.deadline_ms:g} ms deadline"
        lag_ms = figures.load.send_lag_p99_ms
        if lag_ms > CLIENT_LAG_SHARE * figures.deadline_ms:
            # The gateway answers OK only inside the call's gRPC deadline, so an OK seen
            # later than it was held up in the client: say so, the figure stays a miss.
            problem += (
                f" (the client could not keep its schedule, send lag p99 {lag_ms:.0f} ms, and its own"
                " delay is inside that figure)"
            )
        problems.append(problem)
    if other := figures.shed()["other"]:
        problems.append(f"{other} calls failed with codes other than {' or '.join(SHED_CODES)}")
    growth = figures.rss_growth()
    if growth is not None and growth > RSS_FLAT_GROWTH:
        problems.append(f"mesh RSS grew {growth:.0%} (flat: <= {RSS_FLAT_GROWTH:.0%})")
    return problems


async def measure_overload(connection: Connection, config: ScenarioConfig, mesh_pids: Sequence[int]) -> OverloadFigures:
    """Probe closed loop at concurrency 32, then send twice its OK rate open loop.

    ``mesh_pids`` are the mesh's processes ([] when they are not ours: RSS not measured).
    """
    probe_s = min(PROBE_DURATION_S, config.bench.duration_s)
    probe = await measure_closed(connection, PROBE_CONCURRENCY, window_after(config.bench.warmup_s, probe_s))
    sustainable = probe.ok_per_s()
    if sustainable <= 0:
        raise SystemExit(f"bench: the probe at concurrency {PROBE_CONCURRENCY} had no OK call: {probe.overall.errors}")
    _progress(f"sustainable: {sustainable:.0f} req/s; sending {OVERLOAD_FACTOR * sustainable:.0f}/s")
    window = window_after(config.bench.warmup_s, config.bench.duration_s)
    rss = asyncio.create_task(_rss_during(window, mesh_pids)) if mesh_pids else None
    load = await measure_open(connection, OVERLOAD_FACTOR * sustainable, window)
    start_kib, end_kib = await rss if rss is not None else (None, None)
    return OverloadFigures(sustainable, probe_s, config.request_timeout_s * 1e3, load, start_kib, end_kib)


# ------------------------------------------------------------------ flags


def _rate_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(value > 0 and math.isfinite(value) for value in values):
        raise argparse.ArgumentTypeError(f"expected positive rates per second separated by commas, got {text!r}")
    return values


def _name_list(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(","))
    if not all(names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct model names separated by commas, got {text!r}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("open-loop, overload and several models")
    group.add_argument(
        "--rates", type=_rate_list, default=env_default("BENCH_RATES", "50,100,200"), help="open-loop calls/s"
    )
    group.add_argument(
        "--models",
        type=_name_list,
        default=env_default("BENCH_MODELS", None),
        help="several models, taken in turn (sweep, open-loop, overload); default: --model",
    )
    group.add_argument(
        "--request-timeout-s",
        type=float,
        default=env_default("BENCH_REQUEST_TIMEOUT_S", 2.0),
        help="each open-loop call's gRPC timeout; overload's deadline",
    )
    group.add_argument(
        "--plot", default=env_default("BENCH_PLOT", None), help="write a latency plot (PNG; needs meshserve[bench])"
    )


def scenario_config(args: argparse.Namespace) -> ScenarioConfig:
    from meshserve_bench.sweep import _config

    if args.request_timeout_s <= 0 or args.duration_s <= 0:
        raise SystemExit("bench: --request-timeout-s and --duration-s must be > 0")
    if args.plot and args.scenario == "overload":
        raise SystemExit("bench: --plot draws the sweep and open-loop scenarios, not overload")
    return ScenarioConfig(
        bench=_config(args),
        scenario=args.scenario,
        models=args.models or (args.model,),
        rates_per_s=args.rates,
        request_timeout_s=args.request_timeout_s,
        plot_path=Path(args.plot) if args.plot else None,
    )


def uses_scenarios(args: argparse.Namespace) -> bool:
    """Whether ``args`` need this module: open-loop, overload, or a sweep over several models."""
    return args.scenario in ("open-loop", "overload") or len(args.models or ()) > 1


# ------------------------------------------------------------------ entry point


def _raw_max_batch(model: ModelInfo, config: ScenarioConfig) -> int:
    """Open-loop and overload calls are batch 1: raw runs batch 1 only; the sweep tries up to the max."""
    if config.scenario != "sweep" or model.max_batch_size <= 0:
        return 1
    return config.bench.max_batch or model.max_batch_size


def estimate_s(config: ScenarioConfig, models: Sequence[ModelInfo]) -> float:
    """The run's warm-up plus measured seconds, for the progress bar."""
    bench = config.bench
    point_s = bench.warmup_s + bench.duration_s
    if config.scenario == "overload":
        return bench.warmup_s + min(PROBE_DURATION_S, bench.duration_s) + point_s
    raw_points = sum(len(raw_batches(_raw_max_batch(model, config))) for model in models)
    load_points = len(config.rates_per_s) if config.scenario == "open-loop" else len(bench.concurrencies)
    return (raw_points + load_points) * point_s


def _measure_raws(config: ScenarioConfig, models: Sequence[ModelInfo]) -> tuple[dict[str, RawFigures], float | None]:
    """Raw ONNX Runtime per model (none for overload); the busiest other-cores figure among them."""
    raws: dict[str, RawFigures] = {}
    noise: list[float] = []
    for model in models if config.scenario != "overload" else ():
        warmup_s, duration_s = config.bench.warmup_s, config.bench.duration_s
        _progress(f"raw ONNX Runtime, model {model.name}")
        raws[model.name], other_cores = measure_raw_with_noise(
            model, _raw_max_batch(model, config), warmup_s, duration_s
        )
        noise += [] if other_cores is None else [other_cores]
    return raws, max(noise, default=None)


async def _load(
    target: str, config: ScenarioConfig, models: Sequence[ModelInfo], mesh_pids: Sequence[int]
) -> tuple[list[LoadFigures], OverloadFigures | None]:
    """The scenario's points on fresh channels each (overload: probe and flood on the same ones)."""
    requests = {model.name: build_request(model) for model in models}
    bench = config.bench
    if config.scenario == "overload":
        async with connect(target, MAX_DEFAULT_CHANNELS, requests, config.request_timeout_s) as connection:
            return [], await measure_overload(connection, config, mesh_pids)
    points = []
    if config.scenario == "open-loop":
        for rate in config.rates_per_s:
            async with connect(target, MAX_DEFAULT_CHANNELS, requests, config.request_timeout_s) as connection:
                point = await measure_open(connection, rate, window_after(bench.warmup_s, bench.duration_s))
            _progress(f"rate {rate:g}/s: {_point_text(point)}")
            points.append(point)
        return points, None
    for concurrency in bench.concurrencies:
        channels = bench.channels or min(concurrency, MAX_DEFAULT_CHANNELS)
        async with connect(target, channels, requests, REQUEST_TIMEOUT_S) as connection:
            point = await measure_closed(connection, concurrency, window_after(bench.warmup_s, bench.duration_s))
        _progress(f"concurrency {concurrency}: {_point_text(point)}")
        points.append(point)
    return points, None


def _point_text(point: LoadFigures) -> str:
    overall = point.overall
    return (
        f"{point.ok_per_s():.0f} ok/s, p50 {overall.p50_ms:.2f} ms, p99 {overall.p99_ms:.2f} ms,"
        f" {sum(overall.errors.values())} errors, client cpu {point.client_cpu_s / point.duration_s:.2f}"
    )


def run_scenario(args: argparse.Namespace) -> int:
    """Reach a ready mesh, measure raw ONNX Runtime per model while it idles, run the scenario.

    Prints the report; returns 1 when a sweep call failed (errors are what open-loop and
    overload measure: 0 whether or not overload's target is met).
    """
    from meshserve_bench import scenarios_report as report
    from meshserve_bench.sweep import _exit_on_sigterm, _find_model, _require_ready, machine_info, own_mesh

    config = scenario_config(args)
    if config.plot_path is not None:
        require_matplotlib()
    models = [_find_model(config.bench.repository, name) for name in config.models]
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    target = config.bench.target
    with contextlib.nullcontext(target) if target else own_mesh(config.bench.repository) as address:
        for model in models:
            asyncio.run(_require_ready(address, model))
        freeze_startup_heap()  # the client's own GC pauses would show as mesh latency
        mesh_pids = [] if target else descendants(os.getpid())  # own_mesh's `up` and its children
        with progress_bar(f"bench {config.scenario}", estimate_s(config, models)):
            raws, other_cores = _measure_raws(config, models)
            points, overload = asyncio.run(_load(address, config, models, mesh_pids))
    machine = machine_info(other_cores)
    if overload is not None:
        print(report.format_overload_report(config, machine, overload), flush=True)
    else:
        print(report.format_load_report(config, machine, raws, points), flush=True)
    if config.bench.json_path is not None:
        figures = report.report_json(config, machine, raws, points, overload)
        config.bench.json_path.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    if config.plot_path is not None:
        report.plot_points(config.plot_path, config, points, raws)
    return 1 if config.scenario == "sweep" and any(point.overall.errors for point in points) else 0
