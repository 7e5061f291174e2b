"""``meshserve bench``: drive a mesh over gRPC and set it beside raw ONNX Runtime.

Once the mesh is ready, and while it idles (under load both would compete for
the same CPUs), the raw baseline runs in this process: an ``InferenceSession`` on
the same ``model.onnx``, batch 1 latency, and items/s at batch 1, 8 and the
model's max batch. Then, for each
concurrency, ``concurrency`` closed-loop clients (asyncio + grpc.aio) each send
one-item ModelInfer calls, reusing one request message, for ``--warmup-s`` and
then ``--duration-s``. A call counts when it completes inside the measured window.

Without ``--target`` the bench starts ``python -m meshserve up`` on free ports,
waits for its "meshserve ready:" line and stops it with SIGTERM at the end.
The client's own CPU time is reported, so a saturated client is visible.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import os
import platform
import resource
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

import grpc
import numpy as np

from meshserve.devkit.redis_server import RedisServer, binary_from_env
from meshserve.models.repository import ANY_DIM, ModelInfo, TensorInfo, scan_repository
from meshserve.platform.heap import freeze_startup_heap
from meshserve.settings import env_default
from meshserve.wire.dtypes import NUMPY_BY_KSERVE
from meshserve_bench.display import text_table
from meshserve_bench.redis_cost import RedisUsage, per_call_lines, snapshot

# protos and onnxruntime are imported where used: every `meshserve` command imports this module.
if TYPE_CHECKING:
    from protos import grpc_service_pb2 as pb

READY_PREFIX = "meshserve ready:"
MESH_READY_TIMEOUT_S = 180.0
MESH_STOP_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 30.0
MAX_DEFAULT_CHANNELS = 8
OTHER_SYMBOLIC_DIM = 32  # a symbolic dim other than the batch dim becomes this
CLIENT_BOUND_CPU_FRACTION = 0.9
BUSY_MACHINE_CORES = 0.25  # other processes busier than this during the raw run make figures noisy
# Separate TCP connections per channel (by default channels to one target share one).
_CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]


# ------------------------------------------------------------------ figures


@dataclass(frozen=True, slots=True)
class RawFigures:
    """In-process ONNX Runtime: batch-1 latency and items/s per batch size tried.

    ``idle_p50_ms``: batch-1 p50 when every run follows ``IDLE_GAP_S`` of sleep, as
    a worker at concurrency 1 runs it (None where it was not measured).
    ``worker_idle_p50_ms``: the same, on the session a worker builds (its thread
    settings: idle threads sleep unless the worker spins); None where the worker
    spins like ONNX Runtime's default, or it was not measured."""

    p50_ms: float
    p99_ms: float
    items_per_s_by_batch: dict[int, float]
    idle_p50_ms: float | None = None
    worker_idle_p50_ms: float | None = None

    def best_batch(self) -> int:
        return max(self.items_per_s_by_batch, key=lambda batch: self.items_per_s_by_batch[batch])

    def best_items_per_s(self) -> float:
        return self.items_per_s_by_batch[self.best_batch()]


@dataclass(frozen=True, slots=True)
class PointFigures:
    """One concurrency level against the mesh, over ``duration_s`` of wall time."""

    concurrency: int
    channels: int
    duration_s: float
    requests: int  # successful calls completed inside the window
    p50_ms: float
    p99_ms: float
    errors: dict[str, int]  # gRPC status code name -> count
    client_cpu_s: float  # user + system CPU of this process inside the window
    redis: RedisUsage | None = None  # what Redis did inside the window, where the bench can see it

    def req_per_s(self) -> float:
        return self.requests / self.duration_s

    def calls(self) -> int:
        """Calls completed inside the window, failed ones included."""
        return self.requests + sum(self.errors.values())

    def client_cpu_fraction(self) -> float:
        """CPU seconds per wall second; 1.0 is one core fully busy."""
        return self.client_cpu_s / self.duration_s


@dataclass(frozen=True, slots=True)
class Comparison:
    """A mesh point relative to the raw baseline."""

    throughput_ratio: float  # mesh req/s / raw best-batch items/s
    added_p50_ms: float  # mesh p50 - raw batch-1 p50
    added_p99_ms: float


def compare(point: PointFigures, raw: RawFigures) -> Comparison:
    best = raw.best_items_per_s()
    ratio = point.req_per_s() / best if best > 0 else math.nan
    return Comparison(ratio, point.p50_ms - raw.p50_ms, point.p99_ms - raw.p99_ms)


def percentile_ms(latencies_ns: Sequence[int], percent: float) -> float:
    """The ``percent``-th percentile (linear interpolation) in ms; NaN when empty."""
    if not latencies_ns:
        return math.nan
    return float(np.percentile(np.asarray(latencies_ns, dtype=np.int64), percent)) / 1e6


# ------------------------------------------------------------------ inputs


def _input_shape(tensor: TensorInfo, batch: int, batchable: bool) -> tuple[int, ...]:
    """The graph shape with symbolic dims filled: dim 0 is ``batch`` when batchable."""
    dims = [OTHER_SYMBOLIC_DIM if dim == ANY_DIM else dim for dim in tensor.shape]
    if batchable:
        dims[0] = batch
    return tuple(dims)


def random_inputs(model: ModelInfo, batch: int, seed: int = 0) -> dict[str, np.ndarray[Any, Any]]:
    """Random tensors for every input of ``model``, ``batch`` items each."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    for tensor in model.inputs:
        dtype = NUMPY_BY_KSERVE.get(tensor.datatype)
        if dtype is None or tensor.datatype == "BYTES":
            raise SystemExit(f"bench: input '{tensor.name}': cannot generate {tensor.datatype} data")
        shape = _input_shape(tensor, batch, model.max_batch_size > 0)
        if dtype.kind == "f":
            arrays[tensor.name] = rng.standard_normal(shape).astype(dtype)
        else:
            arrays[tensor.name] = rng.integers(0, 2, shape).astype(dtype)
    return arrays


def build_request(model: ModelInfo) -> pb.ModelInferRequest:
    """One batch-1 ModelInfer request, built once and reused by every client."""
    from protos import grpc_service_pb2 as pb

    request = pb.ModelInferRequest(model_name=model.name, model_version=str(model.version))
    arrays = random_inputs(model, batch=1)
    for tensor in model.inputs:
        request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=arrays[tensor.name].shape)
        request.raw_input_contents.append(arrays[tensor.name].tobytes())
    return request


# ------------------------------------------------------------------ raw ONNX Runtime


IDLE_GAP_S = 0.004
"""The sleep before each run of the idle-gap reference: about what a request spends
outside the model at concurrency 1 on the 2-core reference machine. On that VM a
run that follows it takes about twice as long as one run back to back (cold
caches, a core woken from idle), in ONNX Runtime alone, with no mesh involved."""


def _timed_runs_ns(run: Callable[[], object], duration_s: float, gap_s: float = 0.0) -> list[int]:
    """Call ``run`` for ``duration_s``, back to back or after ``gap_s`` of sleep each
    time; the latency of each call in ns."""
    latencies_ns: list[int] = []
    end_ns = time.perf_counter_ns() + int(duration_s * 1e9)
    while time.perf_counter_ns() < end_ns:
        if gap_s:
            time.sleep(gap_s)
        start_ns = time.perf_counter_ns()
        run()
        latencies_ns.append(time.perf_counter_ns() - start_ns)
    return latencies_ns


def raw_batches(max_batch: int) -> list[int]:
    """Batch sizes for the raw run: 1, 8 when below the max, and the max."""
    return sorted({1, max_batch} | ({8} if 1 < 8 < max_batch else set()))


def measure_raw(model: ModelInfo, max_batch: int, warmup_s: float, duration_s: float) -> RawFigures:
    """Run ``model.onnx`` in-process on CPU (default threads) at each batch size;
    then batch 1 once more on the session a worker builds, when that differs."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    items_per_s: dict[int, float] = {}
    batch1_ns: list[int] = []
    idle_ns: list[int] = []
    for batch in raw_batches(max_batch):
        run = functools.partial(session.run, None, random_inputs(model, batch))
        _timed_runs_ns(run, warmup_s)
        latencies_ns = _timed_runs_ns(run, duration_s)
        items_per_s[batch] = batch * len(latencies_ns) / (sum(latencies_ns) / 1e9)
        _progress(f"raw batch {batch}: {items_per_s[batch]:.0f} items/s, p50 {percentile_ms(latencies_ns, 50):.2f} ms")
        if batch == 1:
            batch1_ns = latencies_ns
            idle_ns = _timed_runs_ns(run, duration_s / 2, IDLE_GAP_S)
            _progress(f"raw batch 1 after {IDLE_GAP_S * 1000:g} ms idle: p50 {percentile_ms(idle_ns, 50):.2f} ms")
    del session  # its spinning threads would run beside the worker's session
    worker_ns = _worker_session_idle_runs_ns(model, warmup_s, duration_s / 2)
    if worker_ns:
        _progress(f"raw batch 1 on a worker's session, after idle: p50 {percentile_ms(worker_ns, 50):.2f} ms")
    return RawFigures(
        percentile_ms(batch1_ns, 50),
        percentile_ms(batch1_ns, 99),
        items_per_s,
        percentile_ms(idle_ns, 50),
        percentile_ms(worker_ns, 50) if worker_ns else None,
    )


def _worker_session_idle_runs_ns(model: ModelInfo, warmup_s: float, duration_s: float) -> list[int]:
    """Batch 1 after ``IDLE_GAP_S`` on the session a CPU worker of this environment
    builds (``MESHSERVE_INTRA_OP_*``, as ``meshserve up`` passes them on): by
    default its idle threads sleep, and a lone request wakes them op by op. [] when
    the worker spins, as ONNX Runtime does by default: the line above is its figure."""
    if env_default("INTRA_OP_SPINNING", False):
        return []
    from model_workers.session import LoadedModel

    loaded = LoadedModel(model, device="cpu", intra_op_threads=env_default("INTRA_OP_THREADS", 0))
    run = functools.partial(loaded.run, random_inputs(model, 1))
    _timed_runs_ns(run, warmup_s)
    return _timed_runs_ns(run, duration_s, IDLE_GAP_S)


# ------------------------------------------------------------------ mesh load


@dataclass(frozen=True, slots=True)
class _Window:
    """The measured span, in perf_counter ns: calls completing inside it count."""

    start_ns: int
    end_ns: int


@dataclass(slots=True)
class _Tally:
    """What the clients of one point saw inside the window; one event loop writes it."""

    latencies_ns: list[int] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)


async def _call(infer: Any, request: pb.ModelInferRequest) -> str | None:
    """One ModelInfer; None on success, else the gRPC status code name."""
    try:
        await infer(request, timeout=REQUEST_TIMEOUT_S)
    except grpc.aio.AioRpcError as exc:
        return str(exc.code().name)
    return None


async def _client(infer: Any, request: pb.ModelInferRequest, window: _Window, tally: _Tally) -> None:
    """A closed-loop client: the next call starts when the previous one returns."""
    while (start_ns := time.perf_counter_ns()) < window.end_ns:
        code = await _call(infer, request)
        end_ns = time.perf_counter_ns()
        if not window.start_ns <= end_ns <= window.end_ns:
            continue
        if code is None:
            tally.latencies_ns.append(end_ns - start_ns)
        else:
            tally.errors[code] += 1


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _sleep_until(deadline_ns: int) -> None:
    await asyncio.sleep(max(0.0, (deadline_ns - time.perf_counter_ns()) / 1e9))


async def _cpu_s_during(window: _Window) -> float:
    """This process's CPU seconds (all threads, gRPC's included) inside ``window``."""
    await _sleep_until(window.start_ns)
    before_s = _cpu_s()
    await _sleep_until(window.end_ns)
    return _cpu_s() - before_s


async def _redis_usage_during(window: _Window, redis: Any) -> RedisUsage:
    """What ``redis`` (a ``redis.asyncio.Redis``) did inside ``window``."""
    await _sleep_until(window.start_ns)
    before = await snapshot(redis)
    await _sleep_until(window.end_ns)
    return (await snapshot(redis)).usage_since(before)


async def measure_point(
    target: str,
    request: pb.ModelInferRequest,
    concurrency: int,
    channels: int,
    warmup_s: float,
    duration_s: float,
    redis: Any = None,
) -> PointFigures:
    """Drive ``target`` with ``concurrency`` clients spread over ``channels`` channels;
    with ``redis`` (the mesh's, a ``redis.asyncio.Redis``), also read what it did."""
    from protos import grpc_service_pb2_grpc as pb_grpc

    opened = [grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS) for _ in range(channels)]
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            await asyncio.gather(*(channel.channel_ready() for channel in opened))
        calls = [pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer for channel in opened]
        start_ns = time.perf_counter_ns() + int(warmup_s * 1e9)
        window, tally = _Window(start_ns, start_ns + int(duration_s * 1e9)), _Tally()
        async with asyncio.timeout(warmup_s + duration_s + REQUEST_TIMEOUT_S + CONNECT_TIMEOUT_S):
            async with asyncio.TaskGroup() as group:
                for index in range(concurrency):
                    group.create_task(_client(calls[index % channels], request, window, tally))
                redis_usage = None if redis is None else group.create_task(_redis_usage_during(window, redis))
                cpu_s = await _cpu_s_during(window)
    finally:
        await asyncio.gather(*(channel.close() for channel in opened))
    latencies_ns = tally.latencies_ns
    p50_ms, p99_ms = percentile_ms(latencies_ns, 50), percentile_ms(latencies_ns, 99)
    usage = None if redis_usage is None else redis_usage.result()
    errors = dict(tally.errors)
    return PointFigures(concurrency, channels, duration_s, len(latencies_ns), p50_ms, p99_ms, errors, cpu_s, usage)


async def _require_ready(target: str, model: ModelInfo) -> None:
    """Fail fast, with the reason, when the mesh does not serve the model."""
    from protos import grpc_service_pb2 as pb
    from protos import grpc_service_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            reply = await stub.ModelReady(pb.ModelReadyRequest(name=model.name, version=str(model.version)), timeout=10)
        except grpc.aio.AioRpcError as exc:
            raise SystemExit(f"bench: {target}: ModelReady failed: {exc.code().name}: {exc.details()}") from exc
    if not reply.ready:
        raise SystemExit(f"bench: {target}: model '{model.name}' version {model.version} is not ready")


async def measure_mesh(target: str, model: ModelInfo, config: BenchConfig) -> list[PointFigures]:
    """One point per concurrency, in order, each on fresh channels."""
    from redis.asyncio import Redis

    request = build_request(model)
    points: list[PointFigures] = []
    redis = None if config.redis_url is None else Redis.from_url(config.redis_url)
    try:
        for concurrency in config.concurrencies:
            channels = config.channels or min(concurrency, MAX_DEFAULT_CHANNELS)
            points.append(await _sweep_point(target, request, concurrency, channels, config, redis))
    finally:
        if redis is not None:
            await redis.aclose()
    return points


async def _sweep_point(
    target: str, request: pb.ModelInferRequest, concurrency: int, channels: int, config: BenchConfig, redis: Any
) -> PointFigures:
    point = await measure_point(target, request, concurrency, channels, config.warmup_s, config.duration_s, redis)
    _progress(
        f"concurrency {concurrency}: {point.req_per_s():.0f} req/s, p50 {point.p50_ms:.2f} ms,"
        f" p99 {point.p99_ms:.2f} ms, {sum(point.errors.values())} errors,"
        f" client cpu {point.client_cpu_fraction():.2f}"
    )
    return point


# ------------------------------------------------------------------ own mesh


def _wait_for_ready_line(stdout: IO[str], timeout_s: float) -> bool:
    """True once ``stdout`` shows the ready line, False at EOF (the mesh exited).

    A daemon thread keeps draining ``stdout`` afterwards, so the pipe never fills.
    """
    seen, finished = threading.Event(), threading.Event()

    def pump() -> None:
        for line in stdout:
            if line.startswith(READY_PREFIX):
                seen.set()
                finished.set()
        finished.set()

    threading.Thread(target=pump, name="mesh-stdout", daemon=True).start()
    if not finished.wait(timeout_s):
        raise SystemExit(f"bench: the mesh was not ready within {timeout_s:.0f} s")
    return seen.is_set()


@contextlib.contextmanager
def own_mesh(repository: Path, up_args: Sequence[str] = ()) -> Iterator[str]:
    """Run ``meshserve up`` (plus ``up_args``) on free loopback ports; yields its gRPC address."""
    from meshserve.devkit.redis_server import free_port

    grpc_port, metrics_port = free_port(), free_port()
    command = [sys.executable, "-m", "meshserve", "up", "--host", "127.0.0.1", "--grpc-port", str(grpc_port)]
    command += ["--metrics-port", str(metrics_port), "--model-repository", str(repository), *up_args]
    env = {"MESHSERVE_LOG_LEVEL": "WARNING", **os.environ}
    _progress("starting a mesh: python " + " ".join(command[1:]))
    proc = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        assert proc.stdout is not None
        if not _wait_for_ready_line(proc.stdout, MESH_READY_TIMEOUT_S):
            raise SystemExit(f"bench: the mesh exited (code {proc.wait()}) before it was ready")
        yield f"127.0.0.1:{grpc_port}"
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM (the mesh drains and stops its children), SIGKILL after a deadline."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(MESH_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _progress(f"the mesh did not stop within {MESH_STOP_TIMEOUT_S:.0f} s; killing it")
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------ report


def machine_info(other_cores_during_raw: float | None) -> dict[str, Any]:
    import onnxruntime as ort

    return {
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "other_cores_during_raw": other_cores_during_raw,
    }


def _machine_busy_s() -> float | None:
    """CPU seconds all cores have spent busy since boot (/proc/stat); None off Linux."""
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # idle and iowait are not busy


def measure_raw_with_noise(
    model: ModelInfo, max_batch: int, warmup_s: float, duration_s: float
) -> tuple[RawFigures, float | None]:
    """:func:`measure_raw`, and how many cores other processes kept busy meanwhile (None off Linux)."""
    machine_before_s, own_before_s, wall_before_s = _machine_busy_s(), _cpu_s(), time.perf_counter()
    raw = measure_raw(model, max_batch, warmup_s, duration_s)
    machine_after_s, own_after_s, wall_after_s = _machine_busy_s(), _cpu_s(), time.perf_counter()
    if machine_before_s is None or machine_after_s is None:
        return raw, None
    other_s = (machine_after_s - machine_before_s) - (own_after_s - own_before_s)
    return raw, max(0.0, other_s / (wall_after_s - wall_before_s))


def _raw_line(raw: RawFigures) -> str:
    best = raw.best_batch()
    batches = [
        f"batch {batch}: {items_per_s:.0f} items/s" + (" (best)" if batch == best else "")
        for batch, items_per_s in sorted(raw.items_per_s_by_batch.items())
        if batch != 1
    ]
    batch1 = f"batch 1 p50 {raw.p50_ms:.2f} ms p99 {raw.p99_ms:.2f} ms, {raw.items_per_s_by_batch[1]:.0f} items/s"
    line = "; ".join([f"raw ONNX Runtime: {batch1}" + (" (best)" if best == 1 else ""), *batches])
    if raw.idle_p50_ms is not None:
        gap = f"{IDLE_GAP_S * 1000:g} ms idle"
        line += f"\nraw batch 1 after {gap} (how a lone request finds it): p50 {raw.idle_p50_ms:.2f} ms"
    if raw.worker_idle_p50_ms is not None:
        line += (
            f"\nraw batch 1 after {IDLE_GAP_S * 1000:g} ms idle on a worker's session (idle threads sleep):"
            f" p50 {raw.worker_idle_p50_ms:.2f} ms"
        )
    return line


def _point_row(point: PointFigures, raw: RawFigures) -> list[str]:
    vs = compare(point, raw)
    return [
        str(point.concurrency),
        f"{point.req_per_s():.0f}",
        f"{point.p50_ms:.2f}",
        f"{point.p99_ms:.2f}",
        str(sum(point.errors.values())),
        f"{vs.throughput_ratio:.2f}",
        f"{vs.added_p50_ms:+.2f}",
        f"{vs.added_p99_ms:+.2f}",
        f"{point.client_cpu_fraction():.2f}",
    ]


def format_report(
    model: str, duration_s: float, machine: dict[str, Any], raw: RawFigures, points: Sequence[PointFigures]
) -> str:
    """The plain-text table printed at the end of a run."""
    header = ["concurrency", "req/s", "p50 ms", "p99 ms", "errors", "x raw best", "+p50 ms", "+p99 ms", "client cpu"]
    lines = [
        f"model {model}, {duration_s:g} s per point, machine: {machine['cores']} cores, {machine['platform']}",
        _raw_line(raw),
        *text_table(header, [_point_row(point, raw) for point in points]),
    ]
    other_cores = machine.get("other_cores_during_raw")
    if other_cores is not None and other_cores > BUSY_MACHINE_CORES:
        lines.append(f"note: other processes kept {other_cores:.1f} cores busy during the raw run: figures are noisy")
    for point in points:
        if point.errors:
            codes = ", ".join(f"{code} {count}" for code, count in sorted(point.errors.items()))
            lines.append(f"concurrency {point.concurrency}: errors {codes}")
        if point.client_cpu_fraction() > CLIENT_BOUND_CPU_FRACTION:
            lines.append(f"concurrency {point.concurrency}: client CPU-bound: figures are a lower bound")
    lines += per_call_lines([(point.concurrency, point.calls(), point.redis) for point in points if point.redis])
    return "\n".join(lines)


def report_json(
    config: BenchConfig, machine: dict[str, Any], raw: RawFigures, points: Sequence[PointFigures]
) -> dict[str, Any]:
    """Every figure of the run, for ``--json``."""
    raw_json = {**asdict(raw), "best_batch": raw.best_batch(), "best_items_per_s": raw.best_items_per_s()}
    points_json = [
        {
            **asdict(point),
            "req_per_s": point.req_per_s(),
            "client_cpu_fraction": point.client_cpu_fraction(),
            **_redis_per_call(point),
            **asdict(compare(point, raw)),
        }
        for point in points
    ]
    return {"settings": asdict(config), "machine": machine, "raw": raw_json, "points": points_json}


def _redis_per_call(point: PointFigures) -> dict[str, float]:
    if point.redis is None or point.calls() == 0:
        return {}
    return {
        "redis_commands_per_call": point.redis.commands / point.calls(),
        "redis_cpu_us_per_call": point.redis.cpu_s / point.calls() * 1e6,
    }


def _progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ entry points


@dataclass(frozen=True, slots=True)
class BenchConfig:
    target: str | None  # None: start a mesh
    model: str
    concurrencies: tuple[int, ...]
    duration_s: float
    warmup_s: float
    channels: int | None  # None: min(concurrency, 8)
    json_path: Path | None
    repository: Path
    max_batch: int | None  # None: the model's max_batch_size
    redis_url: str | None = None  # the mesh's Redis, to read what each call cost it; None: not read


def _concurrency_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from meshserve_bench import scenarios as bench_scenarios
    from meshserve_bench import tenants as bench_tenants

    parser.add_argument(
        "--scenario",
        choices=("sweep", "open-loop", "overload", "noisy-neighbor"),
        default=env_default("BENCH_SCENARIO", "sweep"),
        help="sweep: concurrencies beside raw ONNX Runtime; open-loop: fixed rates (--rates);"
        " overload: twice the sustainable rate; noisy-neighbor: one tenant floods, another is timed",
    )
    parser.add_argument("--target", default=env_default("BENCH_TARGET", None), help="HOST:PORT of a running mesh")
    parser.add_argument(
        "--redis-url",
        default=env_default("BENCH_REDIS_URL", None),
        help="with --target: that mesh's Redis, to report what each call cost it (without --target the bench"
        " starts the mesh on a Redis of its own and always reports it)",
    )
    parser.add_argument("--model", default=env_default("BENCH_MODEL", "cnn"))
    parser.add_argument("--concurrency", type=_concurrency_list, default=env_default("BENCH_CONCURRENCY", "1,32"))
    parser.add_argument("--duration-s", type=float, default=env_default("BENCH_DURATION_S", 10.0))
    parser.add_argument("--warmup-s", type=float, default=env_default("BENCH_WARMUP_S", 2.0))
    parser.add_argument("--channels", type=int, default=env_default("BENCH_CHANNELS", None), help="default: min(c, 8)")
    parser.add_argument("--json", default=env_default("BENCH_JSON", None), help="write every figure to this file")
    parser.add_argument(
        "--model-repository",
        default=env_default("MODEL_REPOSITORY", None),
        help="model repository dir (default: generated example models)",
    )
    parser.add_argument(
        "--max-batch", type=int, default=env_default("BENCH_MAX_BATCH", None), help="raw run's max batch"
    )
    bench_scenarios.add_arguments(parser)
    bench_tenants.add_arguments(parser)


def _config(args: argparse.Namespace) -> BenchConfig:
    from meshserve.devkit.examples import default_repository_dir, write_example_repository

    repository = Path(args.model_repository) if args.model_repository else None
    return BenchConfig(
        target=args.target,
        model=args.model,
        concurrencies=args.concurrency,
        duration_s=args.duration_s,
        warmup_s=args.warmup_s,
        channels=args.channels,
        json_path=Path(args.json) if args.json else None,
        repository=repository or write_example_repository(default_repository_dir()),
        max_batch=args.max_batch,
        redis_url=args.redis_url if args.target else None,
    )


def _find_model(repository: Path, name: str) -> ModelInfo:
    """The newest servable version of ``name`` in ``repository``."""
    models, problems = scan_repository(repository)
    versions = [model for model in models if model.name == name]
    if not versions:
        detail = "".join(f"\n  {problem}" for problem in problems)
        raise SystemExit(f"bench: no servable model '{name}' in {repository}{detail}")
    return max(versions, key=lambda model: model.version)


def _plot(path: Path, model: str, config: BenchConfig, raw: RawFigures, points: Sequence[PointFigures]) -> None:
    from meshserve_bench.display import LatencySeries, plot_latency

    series = LatencySeries(model, [point.p50_ms for point in points], [point.p99_ms for point in points])
    title = f"meshserve sweep: {model}, {config.duration_s:g} s per point"
    xs = [point.concurrency for point in points]
    plot_latency(path, title, "closed-loop concurrency", xs, [series], {model: (raw.p50_ms, raw.p99_ms)})


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Unwind (stopping the mesh this bench started) instead of dying on the spot."""
    raise SystemExit(128 + signum)


def run_bench(args: argparse.Namespace) -> int:
    """Reach a ready mesh, measure raw ONNX Runtime while it idles, then load it.

    Prints the table; returns 1 when any call failed. ``--scenario noisy-neighbor``
    runs :mod:`meshserve_bench.tenants` instead; open-loop, overload and ``--models``
    with several names run :mod:`meshserve_bench.scenarios`.
    """
    from meshserve_bench import display as bench_display
    from meshserve_bench import scenarios as bench_scenarios

    if args.scenario == "noisy-neighbor":
        from meshserve_bench.tenants import run_noisy_neighbor

        if args.plot:
            raise SystemExit("bench: --plot draws the sweep and open-loop scenarios, not noisy-neighbor")
        return run_noisy_neighbor(args)
    if bench_scenarios.uses_scenarios(args):
        return bench_scenarios.run_scenario(args)
    if args.plot:
        bench_display.require_matplotlib()
    config = _config(args)
    model = _find_model(config.repository, config.model)
    max_batch = (config.max_batch or model.max_batch_size) if model.max_batch_size > 0 else 1
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    with contextlib.ExitStack() as stack:
        target = config.target
        if target is None:  # a Redis of the bench's own, so that its counters are this mesh's alone
            redis_url = stack.enter_context(RedisServer(binary_from_env())).socket_url
            config = replace(config, redis_url=redis_url)
            target = stack.enter_context(own_mesh(config.repository, ["--redis-url", redis_url]))
        asyncio.run(_require_ready(target, model))
        freeze_startup_heap()  # the client's own GC pauses would show as mesh latency
        points_count = len(raw_batches(max_batch)) + len(config.concurrencies)
        estimate_s = points_count * (config.warmup_s + config.duration_s)
        _progress(f"{points_count} points: about {estimate_s:.0f} s")
        with bench_display.progress_bar("bench sweep", estimate_s):
            raw, other_cores = measure_raw_with_noise(model, max_batch, config.warmup_s, config.duration_s)
            points = asyncio.run(measure_mesh(target, model, config))
    machine = machine_info(other_cores)
    print(format_report(model.name, config.duration_s, machine, raw, points), flush=True)
    if config.json_path is not None:
        config.json_path.write_text(json.dumps(report_json(config, machine, raw, points), indent=2, default=str) + "\n")
    if args.plot:
        _plot(Path(args.plot), model.name, config, raw, points)
    return 1 if any(point.errors for point in points) else 0
