"""The load generator every scenario shares: one reused batch-1 request, channels,
closed and open loops, and what the client itself spent.

A call counts when it completes inside the measured :class:`Window`, which starts
after the warm-up. Open loop sends on a uniform schedule whether or not earlier calls
returned; the send lag (how late a call started against that schedule) tells a busy
client from a slow mesh.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import resource
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from redis.asyncio import Redis

from meshserve.models.repository import ANY_DIM, ModelInfo
from meshserve.wire.dtypes import NUMPY_BY_KSERVE
from meshserve_bench.redis_cost import RedisUsage, snapshot
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc

CONNECT_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 30.0
MAX_DEFAULT_CHANNELS = 8
OTHER_SYMBOLIC_DIM = 32  # a symbolic dim other than the batch dim becomes this
OK = "OK"
# Separate TCP connections per channel (by default channels to one target share one).
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
Metadata = tuple[tuple[str, str], ...]


def percentile_ms(latencies_ns: Sequence[int], percent: float) -> float:
    """The ``percent``-th percentile (linear interpolation) in ms; NaN when empty."""
    if not latencies_ns:
        return math.nan
    return float(np.percentile(np.asarray(latencies_ns, dtype=np.int64), percent)) / 1e6


def random_inputs(model: ModelInfo, batch: int, seed: int = 0) -> dict[str, np.ndarray[Any, Any]]:
    """Random tensors for every input of ``model``, ``batch`` items each (dim 0 when batchable;
    other symbolic dims become ``OTHER_SYMBOLIC_DIM``)."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    for tensor in model.inputs:
        dtype = NUMPY_BY_KSERVE.get(tensor.datatype)
        if dtype is None or tensor.datatype == "BYTES":
            raise SystemExit(f"bench: input '{tensor.name}': cannot generate {tensor.datatype} data")
        shape = [OTHER_SYMBOLIC_DIM if dim == ANY_DIM else dim for dim in tensor.shape]
        if model.max_batch_size > 0:
            shape[0] = batch
        if dtype.kind == "f":
            arrays[tensor.name] = rng.standard_normal(shape).astype(dtype)
        else:
            arrays[tensor.name] = rng.integers(0, 2, shape).astype(dtype)
    return arrays


def build_request(model: ModelInfo) -> pb.ModelInferRequest:
    """One batch-1 ModelInfer request, built once and reused by every client."""
    request = pb.ModelInferRequest(model_name=model.name, model_version=str(model.version))
    for name, array in random_inputs(model, batch=1).items():
        datatype = next(tensor.datatype for tensor in model.inputs if tensor.name == name)
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
    return request


@dataclass(frozen=True, slots=True)
class Window:
    """The measured span, in ``perf_counter_ns`` (the system's monotonic clock, shared
    by processes): calls completing inside it count."""

    start_ns: int
    end_ns: int

    @classmethod
    def after(cls, warmup_s: float, duration_s: float) -> Window:
        start_ns = time.perf_counter_ns() + int(warmup_s * 1e9)
        return cls(start_ns, start_ns + int(duration_s * 1e9))

    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9

    def holds(self, ns: int) -> bool:
        return self.start_ns <= ns <= self.end_ns


@dataclass(frozen=True, slots=True)
class CallFigures:
    """Calls that completed inside one window."""

    ok: int
    p50_ms: float  # of OK calls; NaN when none
    p99_ms: float
    errors: dict[str, int]  # gRPC status code name -> count
    error_p50_ms: float  # how long an error took to come back; NaN when none did
    error_details: dict[str, str]  # the first details seen per error code


@dataclass(slots=True)
class Tally:
    """What calls inside ``window`` came back with; one event loop writes it."""

    window: Window
    latencies_ns: list[int] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    error_latencies_ns: list[int] = field(default_factory=list)
    details: dict[str, str] = field(default_factory=dict)

    def record(self, code: str, details: str, start_ns: int, end_ns: int) -> None:
        """Count one call that ended at ``end_ns`` with ``code``, if the window holds it."""
        if not self.window.holds(end_ns):
            return
        if code == OK:
            self.latencies_ns.append(end_ns - start_ns)
            return
        self.errors[code] += 1
        self.error_latencies_ns.append(end_ns - start_ns)
        self.details.setdefault(code, details)

    def figures(self) -> CallFigures:
        ok_ns = self.latencies_ns
        errors_p50_ms = percentile_ms(self.error_latencies_ns, 50)
        p50_ms, p99_ms = percentile_ms(ok_ns, 50), percentile_ms(ok_ns, 99)
        return CallFigures(len(ok_ns), p50_ms, p99_ms, dict(self.errors), errors_p50_ms, dict(self.details))


Infer = Callable[..., Any]  # a stub's ModelInfer
Call = Callable[[], Coroutine[Any, Any, None]]


async def call(
    infer: Infer, request: pb.ModelInferRequest, timeout_s: float, metadata: Metadata = ()
) -> tuple[str, str]:
    """One ModelInfer: the gRPC status code name (``OK``) and its details."""
    try:
        await infer(request, timeout=timeout_s, metadata=metadata)
    except grpc.aio.AioRpcError as exc:
        return str(exc.code().name), str(exc.details())
    return OK, ""


async def timed_call(
    infer: Infer, request: pb.ModelInferRequest, timeout_s: float, tally: Tally, metadata: Metadata = ()
) -> str:
    """One call, recorded in ``tally``; its status code name."""
    start_ns = time.perf_counter_ns()
    code, details = await call(infer, request, timeout_s, metadata)
    tally.record(code, details, start_ns, time.perf_counter_ns())
    return code


@contextlib.asynccontextmanager
async def open_channels(target: str, channels: int) -> AsyncIterator[list[Infer]]:
    """ModelInfer on ``channels`` ready TCP connections to ``target``; closed on exit."""
    opened = [grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(channels)]
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            await asyncio.gather(*(channel.channel_ready() for channel in opened))
        yield [pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer for channel in opened]
    finally:
        await asyncio.gather(*(channel.close() for channel in opened))


def due_times_ns(first_ns: int, rate_per_s: float, end_ns: int) -> Iterator[int]:
    """Send times at ``rate_per_s`` from ``first_ns``, before ``end_ns``; each computed from
    the first, so rounding does not add up."""
    for index in range(math.ceil((end_ns - first_ns) * rate_per_s / 1e9)):
        due_ns = first_ns + round(index * 1e9 / rate_per_s)
        if due_ns < end_ns:
            yield due_ns


async def open_loop(group: asyncio.TaskGroup, send: Call, rate_per_s: float, window: Window) -> list[int]:
    """Start ``send`` in ``group`` at ``rate_per_s`` until the window ends, never waiting for
    earlier calls; a late start is not skipped. The send lag of each start inside the window, ns."""
    lags_ns: list[int] = []
    for due_ns in due_times_ns(time.perf_counter_ns(), rate_per_s, window.end_ns):
        await sleep_until(due_ns)
        group.create_task(send())
        if due_ns >= window.start_ns:
            lags_ns.append(time.perf_counter_ns() - due_ns)
    return lags_ns


def cpu_s() -> float:
    """This process's user + system CPU seconds, every thread (gRPC's included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid``, every thread (/proc/<pid>/stat);
    None when it cannot be read (off Linux, or the process is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    except (OSError, ValueError, IndexError):
        return None


async def process_cpu_during(window: Window, pid: int | None) -> float | None:
    """CPU seconds process ``pid`` spent inside ``window``; None when it cannot be read."""
    await sleep_until(window.start_ns)
    before_s = None if pid is None else process_cpu_s(pid)
    await sleep_until(window.end_ns)
    after_s = None if pid is None else process_cpu_s(pid)
    return None if before_s is None or after_s is None else after_s - before_s


def machine_busy_s() -> float | None:
    """CPU seconds all cores have spent busy since boot (/proc/stat); None off Linux."""
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # idle and iowait are not busy


async def sleep_until(deadline_ns: int) -> None:
    await asyncio.sleep(max(0.0, (deadline_ns - time.perf_counter_ns()) / 1e9))


async def usage_during(window: Window) -> tuple[float, float | None]:
    """CPU seconds of this process, and busy seconds of the machine (None off Linux), inside ``window``."""
    await sleep_until(window.start_ns)
    cpu_before_s, busy_before_s = cpu_s(), machine_busy_s()
    await sleep_until(window.end_ns)
    cpu_after_s, busy_after_s = cpu_s(), machine_busy_s()
    busy_s = None if busy_before_s is None or busy_after_s is None else busy_after_s - busy_before_s
    return cpu_after_s - cpu_before_s, busy_s


async def redis_usage_during(window: Window, redis: Redis) -> RedisUsage:
    await sleep_until(window.start_ns)
    before = await snapshot(redis)
    await sleep_until(window.end_ns)
    return (await snapshot(redis)).usage_since(before)


@dataclass(frozen=True, slots=True)
class LoadPoint:
    """One concurrency (closed loop) or rate (open loop) over a window of ``duration_s``."""

    offered: float  # clients, or calls per second
    channels: int
    duration_s: float
    calls: CallFigures
    sent: int  # open loop: calls started inside the window; closed loop: calls answered
    send_lag_p99_ms: float | None  # None for closed loop
    client_cpu_s: float  # this process, gRPC's threads included
    machine_busy_s: float | None  # every process on the machine; None off Linux
    redis: RedisUsage | None  # what Redis did inside the window, where the bench can see it

    def ok_per_s(self) -> float:
        return self.calls.ok / self.duration_s

    def answered(self) -> int:
        """Calls completed inside the window, failed ones included."""
        return self.calls.ok + sum(self.calls.errors.values())


def finished_point(
    tally: Tally,
    usage: asyncio.Task[tuple[float, float | None]],
    window: Window,
    rate_per_s: float,
    concurrency: int,
    channels: int,
    lags_ns: list[int] | None,
    redis_usage: asyncio.Task[RedisUsage] | None,
) -> LoadPoint:
    """The point a closed loop (``rate_per_s`` 0) or an open loop measured, once its window ended."""
    calls, (own_cpu_s, busy_s) = tally.figures(), usage.result()
    return LoadPoint(
        offered=rate_per_s or concurrency,
        channels=channels,
        duration_s=window.duration_s(),
        calls=calls,
        sent=len(lags_ns) if lags_ns is not None else calls.ok + sum(calls.errors.values()),
        send_lag_p99_ms=None if lags_ns is None else percentile_ms(lags_ns, 99),
        client_cpu_s=own_cpu_s,
        machine_busy_s=busy_s,
        redis=None if redis_usage is None else redis_usage.result(),
    )


async def measure_point(
    target: str,
    request: pb.ModelInferRequest,
    window: Window,
    *,
    channels: int,
    concurrency: int = 0,
    rate_per_s: float = 0.0,
    timeout_s: float = REQUEST_TIMEOUT_S,
    metadata: Metadata = (),
    redis: Redis | None = None,
    pause_after_error_s: float = 0.0,
) -> LoadPoint:
    """Open loop at ``rate_per_s`` when given, else ``concurrency`` closed-loop clients
    (each pausing ``pause_after_error_s`` after a failed call, as a retrying client does),
    over ``channels`` fresh connections to ``target``; Redis read when ``redis`` is given."""
    tally, lags_ns = Tally(window), None
    bound_s = (window.end_ns - time.perf_counter_ns()) / 1e9 + timeout_s + 2 * CONNECT_TIMEOUT_S
    async with asyncio.timeout(bound_s), open_channels(target, channels) as infers, asyncio.TaskGroup() as group:
        usage = group.create_task(usage_during(window))
        redis_usage = None if redis is None else group.create_task(redis_usage_during(window, redis))
        turns = itertools.cycle(infers)
        if rate_per_s > 0:

            async def send() -> None:
                await timed_call(next(turns), request, timeout_s, tally, metadata)

            lags_ns = await open_loop(group, send, rate_per_s, window)
        else:

            async def client(infer: Infer) -> None:  # the next call when the last returns
                while time.perf_counter_ns() < window.end_ns:
                    code = await timed_call(infer, request, timeout_s, tally, metadata)
                    if code != OK and pause_after_error_s > 0:
                        await asyncio.sleep(pause_after_error_s)

            for _ in range(concurrency):
                group.create_task(client(next(turns)))
    return finished_point(tally, usage, window, rate_per_s, concurrency, channels, lags_ns, redis_usage)
