"""``--scenario scaling``: how each hop's cost per request grows along one axis at a time.

Axes (``--axis``, comma-separated, default all), each from a base point: the example
"mlp" (batch-1 requests of 256 bytes), ``BASE_CONCURRENCY`` closed-loop clients, one
model, the open development tenant:

- ``batch``: requests of 1, 8 and 32 items; x is the items per request (the worker's
  mean batch, from its ``meshserve_worker_batch_size`` histogram, is reported beside);
- ``concurrency``: batch-1 requests at concurrency 1, 8 and 32: the server's batching;
  x is the mean batch the worker ran, not the concurrency;
- ``payload``: "scale_any" requests of 1 KiB, 64 KiB, 1 MiB, 4 MiB and 16 MiB at
  concurrency 1 (one at a time, as the ``large`` scenario sends them); x in MiB;
- ``tenants``: 1, 100, 1 000 and 10 000 tenants in a tenants file, each with its own
  key and limits (far above what it is sent), calls cycling over every tenant's key;
- ``models``: 1, 50, 200 and 500 copies of "mlp", each with ``placement: {device: cpu,
  memory_mb: 1}``, on one CPU worker with room for all, calls cycling over them.

With ``--scaling-rate R`` the tenants and models axes send an open loop at R calls/s
instead of the closed loop: every point then carries the same load, so a cost per call
that rises only because the mesh answered fewer calls (less batching, fixed costs over
fewer calls) is told apart from work that grows with the axis.

Each tenants and models point starts a mesh of its own (on a Redis of its own); the
batch and payload points share one. A point measures, over ``--duration-s`` after
``--warmup-s``: calls/s, p50/p99, each process's CPU µs per request (as the sweep:
:mod:`meshserve_bench.hops`), Redis commands and CPU per call, Redis's used memory and
each process's resident memory at the end. Each hop's series is then fitted along the
axis (:mod:`meshserve_bench.fit`): flat, falling, or linear with its constant.

The client sends each request pre-serialized and does not decode the reply, so its own
CPU, on the same cores, stays small beside the mesh's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import yaml
from redis.asyncio import Redis

from meshserve.devkit.examples import build_mlp
from meshserve.devkit.redis_server import RedisServer, binary_from_env
from meshserve.models.repository import ModelInfo
from meshserve.platform.heap import freeze_startup_heap
from meshserve.store.sentinel import master_client
from meshserve.tenancy.tenants import hash_key
from meshserve_bench.config import BenchConfig
from meshserve_bench.fit import Fit, fit
from meshserve_bench.hops import hop_usage_during, roles
from meshserve_bench.large import image
from meshserve_bench.load import (
    CHANNEL_OPTIONS,
    CONNECT_TIMEOUT_S,
    MAX_DEFAULT_CHANNELS,
    OK,
    REQUEST_TIMEOUT_S,
    LoadPoint,
    Metadata,
    Tally,
    Window,
    finished_point,
    open_loop,
    random_inputs,
    redis_usage_during,
    usage_during,
)
from meshserve_bench.mesh import find_model, own_mesh, progress
from meshserve_bench.scenarios import descendants, point_json, rss_kib
from protos import grpc_service_pb2 as pb

BASE_MODEL = "mlp"
PAYLOAD_MODEL = "scale_any"
BASE_CONCURRENCY = 8
CLIENT_BATCHES = (1, 8, 32)
CONCURRENCIES = (1, 8, 32)
PAYLOAD_KIB = (1, 64, 1024, 4096, 16384)
TENANT_COUNTS = (1, 100, 1000, 10000)
MODEL_COUNTS = (1, 50, 200, 500)
MODEL_MEMORY_MB = 1
READY_TIMEOUT_S = 600.0  # 500 models load one after another on a shared 2-core machine
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
UNLIMITED = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
MIB = 1 << 20

UNITS = {
    "batch": "item per request",
    "concurrency": "item of mean batch",
    "payload": "MiB",
    "tenants": "tenant",
    "models": "model",
}
SHOWN_PER = {"batch": 1.0, "concurrency": 1.0, "payload": 1.0, "tenants": 1000.0, "models": 100.0}
"""The constant is printed per this many units (µs per 1 000 tenants reads better than per tenant)."""

SERIES: dict[str, tuple[Callable[[dict[str, Any]], float | None], float]] = {
    # name -> (the figure in a point's JSON, its absolute noise floor)
    "gateway µs": (lambda p: (p.get("cpu_us_per_request") or {}).get("gateway"), 30.0),
    "worker µs": (lambda p: (p.get("cpu_us_per_request") or {}).get("worker"), 30.0),
    "model compute µs": (lambda p: p.get("model_compute_us_per_request"), 10.0),
    "worker beyond compute µs": (lambda p: p.get("worker_beyond_compute_us_per_request"), 30.0),
    "router µs": (lambda p: (p.get("cpu_us_per_request") or {}).get("router"), 20.0),
    "redis µs": (lambda p: p.get("redis_cpu_us_per_call"), 20.0),
    "redis cmds/call": (lambda p: p.get("redis_commands_per_call"), 1.0),
    "redis MiB": (lambda p: p["redis_used_memory_bytes"] / MIB if p.get("redis_used_memory_bytes") else None, 1.0),
}
"""Each hop's series fitted along an axis."""


@dataclass(frozen=True, slots=True)
class Job:
    """One kind of call of a point: a serialized ModelInferRequest and its metadata."""

    request: bytes
    metadata: Metadata = ()


# ------------------------------------------------------------------ measuring


async def measure_jobs(
    target: str,
    jobs: Sequence[Job],
    window: Window,
    *,
    concurrency: int,
    redis: Redis | None,
    rate_per_s: float = 0.0,
) -> LoadPoint:
    """``concurrency`` closed-loop clients over min(concurrency, 8) fresh connections
    (or, with ``rate_per_s``, an open loop at that rate over 8), each call the next of
    ``jobs`` (cycled: load spread evenly over models or tenants); the reply is not
    decoded. Calls completing inside ``window`` count."""
    tally, turns, lags_ns = Tally(window), itertools.cycle(jobs), None
    channels = MAX_DEFAULT_CHANNELS if rate_per_s > 0 else min(concurrency, MAX_DEFAULT_CHANNELS)
    opened = [grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS + UNLIMITED) for _ in range(channels)]
    bound_s = (window.end_ns - time.perf_counter_ns()) / 1e9 + REQUEST_TIMEOUT_S + 2 * CONNECT_TIMEOUT_S
    try:
        async with asyncio.timeout(bound_s):
            await asyncio.gather(*(channel.channel_ready() for channel in opened))
            infers = [channel.unary_unary(MODEL_INFER) for channel in opened]  # bytes in, bytes out

            async def send(infer: Any) -> None:
                job = next(turns)
                start_ns = time.perf_counter_ns()
                try:
                    await infer(job.request, timeout=REQUEST_TIMEOUT_S, metadata=job.metadata)
                    code, details = OK, ""
                except grpc.aio.AioRpcError as exc:
                    code, details = exc.code().name, str(exc.details())
                tally.record(code, details, start_ns, time.perf_counter_ns())

            async def client(infer: Any) -> None:
                while time.perf_counter_ns() < window.end_ns:
                    await send(infer)

            async with asyncio.TaskGroup() as group:
                usage = group.create_task(usage_during(window))
                redis_usage = None if redis is None else group.create_task(redis_usage_during(window, redis))
                if rate_per_s > 0:
                    infer_turns = itertools.cycle(infers)
                    lags_ns = await open_loop(group, lambda: send(next(infer_turns)), rate_per_s, window)
                else:
                    for i in range(concurrency):
                        group.create_task(client(infers[i % channels]))
    finally:
        await asyncio.gather(*(channel.close() for channel in opened))
    return finished_point(tally, usage, window, rate_per_s, concurrency, channels, lags_ns, redis_usage)


async def send_each_once(target: str, jobs: Sequence[Job], concurrency: int = BASE_CONCURRENCY) -> dict[str, int]:
    """Every job once (``concurrency`` at a time, one connection), before a point measures:
    every tenant or model then has its state in the mesh and in Redis, as in a mesh that
    has served them all. The failed calls, by code."""
    turns, errors = iter(jobs), dict[str, int]()
    async with grpc.aio.insecure_channel(target, options=UNLIMITED) as channel:
        infer = channel.unary_unary(MODEL_INFER)

        async def client() -> None:
            for job in turns:
                try:
                    await infer(job.request, timeout=REQUEST_TIMEOUT_S, metadata=job.metadata)
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] = errors.get(exc.code().name, 0) + 1

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return errors


async def measure(
    target: str,
    jobs: Sequence[Job],
    config: BenchConfig,
    concurrency: int,
    redis: Redis,
    pids: Sequence[int],
    rate_per_s: float = 0.0,
) -> dict[str, Any]:
    """One point: the load, each hop's CPU, the mean batch, Redis's and each process's memory."""
    window = Window.after(config.warmup_s, config.duration_s)
    by_role = roles(pids)
    hops = asyncio.create_task(hop_usage_during(window, pids))
    point = await measure_jobs(target, jobs, window, concurrency=concurrency, redis=redis, rate_per_s=rate_per_s)
    figures = point_json(point, None, await hops)
    figures.setdefault("mean_batch", None)  # from the workers' /metrics (hops), where read
    memory = await redis.info("memory")
    figures["redis_used_memory_bytes"] = int(memory["used_memory"])
    figures["rss_kib"] = {role: rss_kib(found) for role, found in by_role.items()}
    return figures


@contextlib.contextmanager
def mesh(repository: Path, up_args: Sequence[str] = ()) -> Iterator[tuple[str, str]]:
    """A mesh on a Redis of its own: its address and its Redis's URL."""
    with RedisServer(binary_from_env()) as server:
        redis_url = server.socket_url
        up = ["--redis-url", redis_url, "--gpu-workers", "none", "--workers", "1", *up_args]
        with own_mesh(repository, up) as target:
            yield target, redis_url


async def wait_ready(target: str, names: Sequence[str], metadata: Metadata = ()) -> None:
    """Poll ModelReady until every one of ``names`` is ready (``READY_TIMEOUT_S`` in all)."""
    from protos import grpc_service_pb2_grpc as pb_grpc

    pending, deadline_s = list(names), time.monotonic() + READY_TIMEOUT_S
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while pending:
            if time.monotonic() > deadline_s:
                raise SystemExit(f"bench: {len(pending)} models not ready within {READY_TIMEOUT_S:.0f} s")
            still = []
            for name in pending:
                reply = await stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=10.0, metadata=metadata)
                if not reply.ready:
                    still.append(name)
            if still:
                progress(f"{len(still)} of {len(names)} models not ready yet")
                await asyncio.sleep(1.0)  # the router loads them; nothing to wait on but the answer
            pending = still


def run_point(
    target: str,
    redis_url: str,
    jobs: Sequence[Job],
    config: BenchConfig,
    concurrency: int,
    x: float,
    label: str,
    rate_per_s: float = 0.0,
) -> dict[str, Any]:
    """One point against a ready mesh, with a line of progress; its JSON figures."""
    pids = descendants(os.getpid())
    if len(jobs) > 1:
        progress(f"{label}: each of {len(jobs)} kinds of call once first")
        if errors := asyncio.run(send_each_once(target, jobs)):
            progress(f"{label}: failed calls while priming: {errors}")

    async def go() -> dict[str, Any]:
        redis = await master_client(redis_url)
        try:
            return await measure(target, jobs, config, concurrency, redis, pids, rate_per_s)
        finally:
            await redis.aclose()

    freeze_startup_heap()
    figures = asyncio.run(go())
    cpu = figures.get("cpu_us_per_request") or {}
    progress(
        f"{label}: {figures['ok_per_s']:.0f} ok/s, p99 {figures['calls']['p99_ms']:.2f} ms,"
        f" gateway {cpu.get('gateway', float('nan')):.0f} µs, worker {cpu.get('worker', float('nan')):.0f} µs,"
        f" redis {figures.get('redis_cpu_us_per_call', float('nan')):.0f} µs,"
        f" errors {figures['calls']['errors'] or 0}"
    )
    return {"x": x, "label": label, "concurrency": concurrency, "rate_per_s": rate_per_s or None, **figures}


def request_bytes(
    model: ModelInfo, array: np.ndarray[Any, Any] | None = None, name: str | None = None, batch: int = 1
) -> bytes:
    """A request of ``batch`` random items for ``model`` (``array`` as its one input when
    given; ``name`` instead of the model's), serialized."""
    request = pb.ModelInferRequest(model_name=name or model.name, model_version="" if name else str(model.version))
    inputs = {model.inputs[0].name: array} if array is not None else random_inputs(model, batch)
    for input_name, values in inputs.items():
        datatype = next(tensor.datatype for tensor in model.inputs if tensor.name == input_name)
        request.inputs.add(name=input_name, datatype=datatype, shape=values.shape)
        request.raw_input_contents.append(values.tobytes())
    return request.SerializeToString()


# ------------------------------------------------------------------ the axes


def batch_axis(config: BenchConfig) -> list[dict[str, Any]]:
    """Requests of 1, 8 and 32 items at the base concurrency; x: items per request."""
    model = find_model(config.repository, BASE_MODEL)
    points = []
    with mesh(config.repository) as (target, redis_url):
        asyncio.run(wait_ready(target, [model.name]))
        for items in CLIENT_BATCHES:
            jobs = [Job(request_bytes(model, batch=items))]
            label = f"{items} items per request"
            points.append(run_point(target, redis_url, jobs, config, BASE_CONCURRENCY, items, label))
    return points


def concurrency_axis(config: BenchConfig) -> list[dict[str, Any]]:
    """Batch-1 requests at concurrency 1, 8 and 32; x: the mean batch the worker ran."""
    model = find_model(config.repository, BASE_MODEL)
    jobs = [Job(request_bytes(model))]
    points = []
    with mesh(config.repository) as (target, redis_url):
        asyncio.run(wait_ready(target, [model.name]))
        for concurrency in CONCURRENCIES:
            points.append(run_point(target, redis_url, jobs, config, concurrency, 0.0, f"concurrency {concurrency}"))
    for point in points:  # x: the batch the worker actually ran
        point["x"] = point["mean_batch"] if point["mean_batch"] is not None else float("nan")
    return points


def payload_axis(config: BenchConfig) -> list[dict[str, Any]]:
    model = find_model(config.repository, PAYLOAD_MODEL)
    points = []
    with mesh(config.repository) as (target, redis_url):
        asyncio.run(wait_ready(target, [model.name]))
        for kib in PAYLOAD_KIB:
            array = image(kib / 1024)
            jobs = [Job(request_bytes(model, array))]
            points.append(run_point(target, redis_url, jobs, config, 1, array.nbytes / MIB, f"{kib} KiB"))
    return points


def tenants_yaml(keys: Sequence[str], model: str) -> str:
    """``len(keys)`` standard-tier tenants on ``model``, limits far above what each is sent."""
    tenants = [
        {
            "name": f"t{i:05d}",
            "api_keys": [hash_key(key)],
            "rate_per_s": 100000,
            "burst": 100000,
            "max_inflight": 1000,
            "models": [model],
        }
        for i, key in enumerate(keys)
    ]
    return yaml.dump({"tenants": tenants}, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False)


def tenants_axis(config: BenchConfig) -> list[dict[str, Any]]:
    model = find_model(config.repository, BASE_MODEL)
    request, points = request_bytes(model), []
    for count in TENANT_COUNTS:
        keys = [secrets.token_urlsafe(24) for _ in range(count)]
        jobs = [Job(request, (("authorization", f"Bearer {key}"),)) for key in keys]
        with tempfile.TemporaryDirectory(prefix="meshserve-scaling-") as directory:
            path = Path(directory) / "tenants.yaml"
            path.write_text(tenants_yaml(keys, model.name))
            with mesh(config.repository, ["--tenants", str(path), "--host", "127.0.0.1"]) as (target, redis_url):
                asyncio.run(wait_ready(target, [model.name], jobs[0].metadata))
                label, rate_per_s = f"{count} tenants", config.scaling_rate_per_s or 0.0
                points.append(run_point(target, redis_url, jobs, config, BASE_CONCURRENCY, count, label, rate_per_s))
    return points


def write_models(root: Path, count: int) -> list[str]:
    """``count`` copies of "mlp" under ``root``, each placed on the CPU with ``MODEL_MEMORY_MB``."""
    data, names = build_mlp().SerializeToString(), []
    for i in range(count):
        names.append(name := f"m{i:03d}")
        (root / name / "1").mkdir(parents=True)
        (root / name / "1" / "model.onnx").write_bytes(data)
        (root / name / "config.yaml").write_text(f"placement:\n  device: cpu\n  memory_mb: {MODEL_MEMORY_MB}\n")
    return names


def models_axis(config: BenchConfig) -> list[dict[str, Any]]:
    points = []
    for count in MODEL_COUNTS:
        with tempfile.TemporaryDirectory(prefix="meshserve-scaling-") as directory:
            root = Path(directory)
            names = write_models(root, count)
            model = find_model(root, names[0])
            jobs = [Job(request_bytes(model, name=name)) for name in names]
            budget_mb = str(2 * count * MODEL_MEMORY_MB + 100)  # all of them, past the router's headroom
            with mesh(root, ["--memory-budget-mb", budget_mb]) as (target, redis_url):
                progress(f"{count} models: waiting for every one to load")
                asyncio.run(wait_ready(target, names))
                label, rate_per_s = f"{count} models", config.scaling_rate_per_s or 0.0
                points.append(run_point(target, redis_url, jobs, config, BASE_CONCURRENCY, count, label, rate_per_s))
    return points


AXIS_RUNS: dict[str, Callable[[BenchConfig], list[dict[str, Any]]]] = {
    "batch": batch_axis,
    "concurrency": concurrency_axis,
    "payload": payload_axis,
    "tenants": tenants_axis,
    "models": models_axis,
}


# ------------------------------------------------------------------ fitting


def fit_json(result: Fit | None, per: float) -> dict[str, Any] | None:
    if result is None:
        return None
    return {**asdict(result), "per": per, "slope_per_shown_unit": result.slope * per}


def fit_axis(axis: str, points: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Each series of ``SERIES`` fitted along the axis's x."""
    xs = [point["x"] for point in points]
    fits: dict[str, dict[str, Any] | None] = {}
    for name, (figure, floor) in SERIES.items():
        ys = [figure(point) for point in points]
        if any(y is None for y in ys):
            fits[name] = None
            continue
        fits[name] = fit_json(fit(xs, [float(y) for y in ys if y is not None], floor), SHOWN_PER[axis])
    return fits


def run_scaling(config: BenchConfig) -> dict[str, Any]:
    """Every axis of ``config.axes``, one after another; every figure, as JSON."""
    if config.target is not None:
        raise SystemExit("bench: --scenario scaling starts its own meshes (its repositories, tenants): drop --target")
    axes = {}
    for axis in config.axes:
        progress(f"axis {axis}")
        points = AXIS_RUNS[axis](config)
        axes[axis] = {"unit": UNITS[axis], "per": SHOWN_PER[axis], "points": points, "fits": fit_axis(axis, points)}
    return {
        "settings": asdict(replace(config)),
        "model": {"name": BASE_MODEL, "version": 1, "max_batch_size": 32},
        "axes": axes,
    }
