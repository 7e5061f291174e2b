"""The scenarios against one mesh: sweep, open loop, overload.

``sweep``: for each of ``--concurrency``, that many closed-loop clients over
min(concurrency, 8) channels (or ``--channels``), set beside raw ONNX Runtime at its best
batch, beside the one-process reference server, and beside a bare grpc.aio server
answering at each point's pace (the gRPC floor, meshserve_bench/floor.py: the
gateway's CPU per request over it). ``open-loop``: one point per ``--rates`` (calls/s, uniform spacing), each call with
``--request-timeout-s``. ``overload``: a closed-loop probe at concurrency 32 finds the
sustainable rate; the open loop then sends twice that: accepted calls must answer within
the deadline, the excess must be shed (RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED, nothing
else), and the memory of the mesh this bench started must stay flat.

Without ``--target`` the mesh runs on a Redis of the bench's own, whose counters are
then this mesh's alone, so every point reports what it cost Redis; with ``--target``,
only when ``--redis-url`` names that mesh's Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from meshserve.devkit.redis_server import RedisServer, binary_from_env
from meshserve.models.repository import ModelInfo
from meshserve.platform.heap import freeze_startup_heap
from meshserve.store.sentinel import master_client
from meshserve_bench.config import BenchConfig
from meshserve_bench.floor import floor_server, pace_delay_ms
from meshserve_bench.hops import HopUsage, hop_usage_during
from meshserve_bench.load import (
    MAX_DEFAULT_CHANNELS,
    LoadPoint,
    Window,
    build_request,
    measure_point,
    process_cpu_during,
    sleep_until,
)
from meshserve_bench.mesh import find_model, model_json, own_mesh, progress, require_ready
from meshserve_bench.raw import RawFigures, measure_raw
from meshserve_bench.redis_cost import per_call
from meshserve_bench.reference import reference_server
from protos import grpc_service_pb2 as pb

PROBE_CONCURRENCY = 32
PROBE_DURATION_S = 3.0  # at most; --duration-s when shorter
OVERLOAD_FACTOR = 2.0
SHED_CODES = ("RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED")
RSS_FLAT_GROWTH = 0.10  # end RSS over start RSS, minus one, that still counts as flat
CLIENT_LAG_SHARE = 0.1  # an open loop whose send lag p99 passes this share of the deadline is client-bound


# ------------------------------------------------------------------ overload


@dataclass(frozen=True, slots=True)
class OverloadFigures:
    """The probe's sustainable rate, and what the mesh did with twice that."""

    sustainable_per_s: float  # OK calls/s of the closed-loop probe
    probe_duration_s: float
    deadline_ms: float
    load: LoadPoint  # the open loop at OVERLOAD_FACTOR x sustainable_per_s
    rss_start_kib: int | None  # None: not measured (--target: the mesh's processes are not ours)
    rss_end_kib: int | None

    def shed(self) -> dict[str, int]:
        """Errors by shed code; the rest under "other"."""
        errors = Counter(self.load.calls.errors)
        return {**{code: errors.pop(code, 0) for code in SHED_CODES}, "other": sum(errors.values())}

    def rss_growth(self) -> float | None:
        if not self.rss_start_kib or self.rss_end_kib is None:
            return None
        return self.rss_end_kib / self.rss_start_kib - 1.0


def overload_problems(figures: OverloadFigures) -> list[str]:
    """Why the mesh failed overload; empty when accepted calls kept the deadline, the
    excess was shed as RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED and memory stayed flat."""
    problems = []
    calls = figures.load.calls
    if calls.ok == 0:
        problems.append("no call was accepted")
    elif not calls.p99_ms <= figures.deadline_ms:
        problem = f"accepted p99 {calls.p99_ms:.1f} ms is past the {figures.deadline_ms:g} ms deadline"
        lag_ms = figures.load.send_lag_p99_ms or 0.0
        if lag_ms > CLIENT_LAG_SHARE * figures.deadline_ms:
            # The gateway answers OK only inside the call's gRPC deadline, so an OK seen
            # later than it was held up in the client: say so; the figure stays a miss.
            problem += f" (the client lagged its schedule, send lag p99 {lag_ms:.0f} ms, inside that figure)"
        problems.append(problem)
    if other := figures.shed()["other"]:
        problems.append(f"{other} calls failed with codes other than {' or '.join(SHED_CODES)}")
    growth = figures.rss_growth()
    if growth is not None and growth > RSS_FLAT_GROWTH:
        problems.append(f"mesh RSS grew {growth:.0%} (flat: <= {RSS_FLAT_GROWTH:.0%})")
    return problems


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, theirs, ...), from /proc; [] off Linux."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):  # gone meanwhile
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])  # the name may hold ")"
            children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], list(children.get(pid, []))
    while stack:
        found.append(current := stack.pop())
        stack.extend(children.get(current, []))
    return sorted(found)


def rss_kib(pids: Sequence[int]) -> int:
    """The summed VmRSS of ``pids`` still there (a zombie has none), KiB."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
            total += sum(int(line.split()[1]) for line in lines if line.startswith("VmRSS:"))
    return total


async def measure_overload(
    target: str, request: pb.ModelInferRequest, config: BenchConfig, redis: Redis | None, mesh_pids: Sequence[int]
) -> OverloadFigures:
    """Probe closed loop at concurrency 32, then send twice its OK rate open loop;
    ``mesh_pids`` are the mesh's processes ([] when they are not ours: RSS not measured)."""
    probe_s = min(PROBE_DURATION_S, config.duration_s)
    probe_window = Window.after(config.warmup_s, probe_s)
    probe = await measure_point(
        target, request, probe_window, channels=MAX_DEFAULT_CHANNELS, concurrency=PROBE_CONCURRENCY
    )
    if probe.calls.ok == 0:
        raise SystemExit(f"bench: the probe at concurrency {PROBE_CONCURRENCY} had no OK call: {probe.calls.errors}")
    rate_per_s = OVERLOAD_FACTOR * probe.ok_per_s()
    progress(f"sustainable: {probe.ok_per_s():.0f} req/s; sending {rate_per_s:.0f}/s")
    window = Window.after(config.warmup_s, config.duration_s)
    rss_start_kib = rss_end_kib = None
    channels, timeout_s = MAX_DEFAULT_CHANNELS, config.request_timeout_s
    load = asyncio.create_task(
        measure_point(
            target, request, window, channels=channels, rate_per_s=rate_per_s, timeout_s=timeout_s, redis=redis
        )
    )
    if mesh_pids:
        await sleep_until(window.start_ns)
        rss_start_kib = rss_kib(mesh_pids)
        await sleep_until(window.end_ns)
        rss_end_kib = rss_kib(sorted({*mesh_pids, *descendants(os.getpid())}))  # workers restarted meanwhile count
    return OverloadFigures(probe.ok_per_s(), probe_s, timeout_s * 1e3, await load, rss_start_kib, rss_end_kib)


# ------------------------------------------------------------------ a run


def point_json(point: LoadPoint, raw: RawFigures | None, hops: HopUsage | None = None) -> dict[str, Any]:
    """Every figure of a point, with what it is per call to Redis and to each process
    (``hops``, where measured) and beside raw ONNX Runtime."""
    figures: dict[str, Any] = {**asdict(point), "ok_per_s": point.ok_per_s()}
    figures["client_cpu_fraction"] = point.client_cpu_s / point.duration_s
    if point.redis is not None:
        figures.update(per_call(point.redis, point.answered()))
    if hops is not None:
        figures.update(hops.per_request(point.answered()))
    if raw is not None:
        best = raw.best_items_per_s()
        figures["throughput_ratio"] = point.ok_per_s() / best if best > 0 else None
        figures["added_p50_ms"] = point.calls.p50_ms - raw.p50_ms
        figures["added_p99_ms"] = point.calls.p99_ms - raw.p99_ms
    return figures


def raw_json(raw: RawFigures) -> dict[str, Any]:
    return {**asdict(raw), "best_batch": raw.best_batch(), "best_items_per_s": raw.best_items_per_s()}


def overload_json(figures: OverloadFigures) -> dict[str, Any]:
    problems = overload_problems(figures)
    return {
        **asdict(figures),
        "load": point_json(figures.load, None),
        "shed": figures.shed(),
        "rss_growth": figures.rss_growth(),
        "problems": problems,
        "target_met": not problems,
    }


async def load_mesh(
    target: str, model: ModelInfo, config: BenchConfig, mesh_pids: Sequence[int], raw: RawFigures | None
) -> dict[str, Any]:
    """The scenario's points, each on fresh channels, as JSON figures."""
    request = build_request(model)
    redis = None if config.redis_url is None else await master_client(config.redis_url)
    try:
        if config.scenario == "overload":
            return {"overload": overload_json(await measure_overload(target, request, config, redis, mesh_pids))}
        points, sweep = [], config.scenario == "sweep"
        for offered in config.concurrencies if sweep else config.rates_per_s:
            window = Window.after(config.warmup_s, config.duration_s)
            hops = asyncio.create_task(hop_usage_during(window, mesh_pids)) if mesh_pids else None
            if sweep:
                channels = config.channels or min(int(offered), MAX_DEFAULT_CHANNELS)
                point = await measure_point(
                    target, request, window, channels=channels, concurrency=int(offered), redis=redis
                )
            else:
                timeout_s = config.request_timeout_s
                point = await measure_point(
                    target,
                    request,
                    window,
                    channels=MAX_DEFAULT_CHANNELS,
                    rate_per_s=offered,
                    timeout_s=timeout_s,
                    redis=redis,
                )
            calls = point.calls
            progress(f"{offered:g}: {point.ok_per_s():.0f} ok/s, p99 {calls.p99_ms:.2f} ms, errors {calls.errors or 0}")
            points.append(point_json(point, raw, None if hops is None else await hops))
        return {"points": points}
    finally:
        if redis is not None:
            await redis.aclose()


async def load_reference(
    target: str, pid: int, model: ModelInfo, config: BenchConfig, concurrencies: tuple[int, ...] | None = None
) -> list[dict[str, Any]]:
    """The sweep's points (or ``concurrencies``') against the one-process reference
    server, with its CPU per request."""
    request, points = build_request(model), []
    for concurrency in config.concurrencies if concurrencies is None else concurrencies:
        window = Window.after(config.warmup_s, config.duration_s)
        channels = config.channels or min(int(concurrency), MAX_DEFAULT_CHANNELS)
        cpu = asyncio.create_task(process_cpu_during(window, pid))
        point = await measure_point(target, request, window, channels=channels, concurrency=int(concurrency))
        cpu_s = await cpu
        progress(f"reference {concurrency}: {point.ok_per_s():.0f} ok/s, p50 {point.calls.p50_ms:.2f} ms")
        figures = point_json(point, None)
        answered = point.answered()
        figures["cpu_us_per_request"] = {"reference": cpu_s / answered * 1e6} if cpu_s and answered else {}
        points.append(figures)
    return points


def load_floor(points: list[dict[str, Any]], model: ModelInfo, config: BenchConfig) -> list[dict[str, Any]]:
    """Each mesh point's concurrency against a bare grpc.aio server (meshserve_bench/floor.py)
    that answers at the point's pace, with the server's CPU per call."""
    request, floor = build_request(model), []
    for mesh_point in points:
        concurrency = int(mesh_point["offered"])
        delay_ms = pace_delay_ms(concurrency, mesh_point["ok_per_s"])
        with floor_server(delay_ms) as (target, pid):
            floor.append(asyncio.run(_floor_point(target, pid, request, concurrency, config)) | {"delay_ms": delay_ms})
        cpu = floor[-1]["cpu_us_per_request"].get("grpc_floor")
        shown = "-" if cpu is None else f"{cpu:.0f}"
        progress(f"gRPC floor {concurrency}: {floor[-1]['ok_per_s']:.0f} ok/s, {shown} µs CPU per call")
    return floor


async def _floor_point(
    target: str, pid: int, request: pb.ModelInferRequest, concurrency: int, config: BenchConfig
) -> dict[str, Any]:
    window = Window.after(config.warmup_s, config.duration_s)
    channels = config.channels or min(concurrency, MAX_DEFAULT_CHANNELS)
    cpu = asyncio.create_task(process_cpu_during(window, pid))
    point = await measure_point(target, request, window, channels=channels, concurrency=concurrency)
    cpu_s, answered = await cpu, point.answered()
    figures = point_json(point, None)
    figures["cpu_us_per_request"] = {"grpc_floor": cpu_s / answered * 1e6} if cpu_s and answered else {}
    return figures


def beside_floor(points: list[dict[str, Any]], floor: list[dict[str, Any]]) -> None:
    """Each mesh point's gateway CPU per request over the gRPC floor's CPU per call at
    the same concurrency and pace, in place (where both were measured)."""
    for point, at in zip(points, floor, strict=True):
        floor_us = at["cpu_us_per_request"].get("grpc_floor")
        gateway_us = (point.get("cpu_us_per_request") or {}).get("gateway")
        if floor_us is None:
            continue
        point["grpc_floor_cpu_us_per_request"] = floor_us
        if gateway_us is not None:
            point["gateway_over_floor_us_per_request"] = gateway_us - floor_us


def beside_reference(points: list[dict[str, Any]], reference: list[dict[str, Any]]) -> None:
    """Each mesh point's throughput over the reference's at the same concurrency, and
    its p50 above the reference's, in place."""
    by_offered = {point["offered"]: point for point in reference}
    for point in points:
        if (ref := by_offered.get(point["offered"])) is None:
            continue
        point["reference_ratio"] = point["ok_per_s"] / ref["ok_per_s"] if ref["ok_per_s"] > 0 else None
        point["reference_added_p50_ms"] = point["calls"]["p50_ms"] - ref["calls"]["p50_ms"]


def beside_no_wait(points: list[dict[str, Any]], no_wait: list[dict[str, Any]]) -> None:
    """The concurrency-1 point's p50 above the reference server's without batching wait, in place."""
    for point in points:
        for ref in no_wait:
            if ref["offered"] == point["offered"]:
                point["no_wait_added_p50_ms"] = point["calls"]["p50_ms"] - ref["calls"]["p50_ms"]


def run_mesh_scenario(config: BenchConfig) -> dict[str, Any]:
    """Reach a ready mesh (start one on a Redis of its own without ``--target``), measure raw
    ONNX Runtime while it idles (not for overload), then load it; every figure, as JSON."""
    model = find_model(config.repository, config.model)
    with contextlib.ExitStack() as stack:
        target = config.target
        if target is None:
            redis_url = stack.enter_context(RedisServer(binary_from_env())).socket_url
            config = replace(config, redis_url=redis_url)
            target = stack.enter_context(own_mesh(config.repository, ["--redis-url", redis_url]))
        asyncio.run(require_ready(target, model))
        mesh_pids = [] if config.target else descendants(os.getpid())  # own_mesh's `up`, its children, Redis
        freeze_startup_heap()  # the client's own GC pauses would show as mesh latency
        raw = None
        if config.scenario != "overload":
            max_batch = (config.max_batch or model.max_batch_size) if model.max_batch_size > 0 else 1
            progress(f"raw ONNX Runtime, model {model.name}")
            raw = measure_raw(model, max_batch if config.scenario == "sweep" else 1, config.warmup_s, config.duration_s)
        figures = asyncio.run(load_mesh(target, model, config, mesh_pids, raw))
    if config.scenario == "sweep":  # the mesh stopped: the reference has the cores to itself, as the mesh had
        progress(f"one-process reference server, model {model.name}")
        with reference_server(model) as (reference_target, pid):
            reference = asyncio.run(load_reference(reference_target, pid, model, config))
        beside_reference(figures["points"], reference)
        figures["reference"] = {"points": reference}
        progress("bare gRPC server at each point's pace (the gRPC floor)")
        figures["grpc_floor"] = {"points": load_floor(figures["points"], model, config)}
        beside_floor(figures["points"], figures["grpc_floor"]["points"])
        if 1 in config.concurrencies:  # the c=1 target's denominator: a lone request never waits
            progress(f"one-process reference server without batching wait, model {model.name}")
            with reference_server(model, batching_wait=False) as (reference_target, pid):
                no_wait = asyncio.run(load_reference(reference_target, pid, model, config, (1,)))
            beside_no_wait(figures["points"], no_wait)
            figures["reference_no_wait"] = {"points": no_wait}
    return {
        "settings": asdict(config),
        "model": model_json(model),
        "raw": None if raw is None else raw_json(raw),
        **figures,
    }
