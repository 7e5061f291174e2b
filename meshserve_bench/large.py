"""The ``large`` scenario: one request of each ``--sizes`` MiB at a time, beside raw ONNX Runtime.

The model is ``scale_any`` (an FP32 [batch, 1, height, width] image, times 2 plus 1),
sent as one square image per request. For each size: in-process ONNX Runtime's p50
on the same input, then calls through the mesh one after another (at least
``MIN_CALLS``, for ``--duration-s``, each with a 30 s timeout) and their p50 and p99, and each process's peak
resident memory during them (Linux's VmHWM, reset before each size through
``/proc/PID/clear_refs``), beside its resident memory before them: the gateway's,
the worker's and Redis's. The mesh gets ``--max-message-bytes`` for the largest size.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort

from meshserve.devkit.redis_server import RedisServer, binary_from_env
from meshserve.models.repository import ModelInfo
from meshserve_bench.config import BenchConfig
from meshserve_bench.load import REQUEST_TIMEOUT_S, percentile_ms
from meshserve_bench.mesh import find_model, model_json, own_mesh, progress, require_ready
from meshserve_bench.scenarios import descendants, rss_kib
from protos import grpc_service_pb2 as pb

MIB = 1 << 20
MODEL = "scale_any"
MIN_CALLS = 5
ROLES = ("gateway", "worker", "redis")
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
UNLIMITED = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


@dataclass(frozen=True, slots=True)
class SizeFigures:
    """One size: latencies in ms, memory in KiB by role (gateway, worker, redis)."""

    size_mib: float
    payload_bytes: int
    calls: int
    errors: int
    p50_ms: float
    p99_ms: float
    raw_p50_ms: float
    rss_before_kib: dict[str, int]
    peak_kib: dict[str, int]
    echo_p50_ms: float = 0.0
    """gRPC's own floor: the same request's bytes to an echo server and back (no work),
    client and server in the bench's process."""

    def added_p50_ms(self) -> float:
        return self.p50_ms - self.raw_p50_ms

    def peak_over_payload(self) -> dict[str, float]:
        """Each process's peak growth during the size, in payloads."""
        return {
            role: (self.peak_kib[role] - self.rss_before_kib[role]) * 1024 / self.payload_bytes
            for role in self.peak_kib
        }


def image(size_mib: float) -> np.ndarray[Any, Any]:
    """A square FP32 [1, 1, side, side] image of about ``size_mib`` MiB."""
    side = max(1, round(math.sqrt(size_mib * MIB / 4)))
    return np.random.default_rng(0).standard_normal((1, 1, side, side)).astype(np.float32)


def role_pids(pids: Sequence[int]) -> dict[str, list[int]]:
    """The mesh's processes by role, from their command lines."""
    roles: dict[str, list[int]] = {role: [] for role in ROLES}
    for pid in pids:
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            name = os.path.basename(argv[0].decode(errors="replace"))
            if "redis" in name or "valkey" in name:
                roles["redis"].append(pid)
            elif b"meshserve" in argv:
                role = argv[argv.index(b"meshserve") + 1].decode(errors="replace")
                if role in roles:
                    roles[role].append(pid)
    return roles


def reset_peaks(pids: Sequence[int]) -> None:
    """Start each process's VmHWM again from its current RSS (Linux 4.0 and later)."""
    for pid in pids:
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_kib(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
            total += sum(int(line.split()[1]) for line in lines if line.startswith("VmHWM:"))
    return total


def raw_p50_ms(model: ModelInfo, array: np.ndarray[Any, Any], calls: int) -> float:
    session = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    feed = {model.inputs[0].name: array}
    session.run(None, feed)
    latencies_ns: list[int] = []
    for _ in range(calls):
        start_ns = time.perf_counter_ns()
        session.run(None, feed)
        latencies_ns.append(time.perf_counter_ns() - start_ns)
    return percentile_ms(latencies_ns, 50)


async def echo_p50_ms(payload: bytes, calls: int) -> float:
    """p50 of ``calls`` round trips of ``payload`` through a grpc-python echo server
    (identity serializers, port 0), after one to warm up."""

    async def echo(request: bytes, context: Any) -> bytes:
        return request

    server = grpc.aio.server(options=UNLIMITED)
    handler = grpc.unary_unary_rpc_method_handler(echo)  # no serializers: bytes in, bytes out
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Echo", {"Echo": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=UNLIMITED) as channel:
            call = channel.unary_unary("/bench.Echo/Echo")
            await call(payload, timeout=REQUEST_TIMEOUT_S)
            latencies_ns = []
            for _ in range(calls):
                start_ns = time.perf_counter_ns()
                await call(payload, timeout=REQUEST_TIMEOUT_S)
                latencies_ns.append(time.perf_counter_ns() - start_ns)
    finally:
        await server.stop(None)
    return percentile_ms(latencies_ns, 50)


async def mesh_calls(target: str, request: pb.ModelInferRequest, config: BenchConfig) -> tuple[list[int], int]:
    """Calls one after another for ``duration_s`` (at least MIN_CALLS): latencies of OK ones, ns; errors.

    The request is serialized once and sent as bytes, as a client that reuses its
    input would: serializing 16 MiB into fresh memory costs this process 40-60 ms
    per call on a VM (page faults; 8 ms with huge pages, docs/performance.md), which
    would be charged to the mesh."""
    latencies_ns: list[int] = []
    errors = 0
    payload = request.SerializeToString()
    async with grpc.aio.insecure_channel(target, options=UNLIMITED) as channel:
        infer = channel.unary_unary(
            MODEL_INFER, request_serializer=None, response_deserializer=pb.ModelInferResponse.FromString
        )
        await infer(payload, timeout=REQUEST_TIMEOUT_S)  # warm: connection, first allocation
        end_s = time.perf_counter() + config.duration_s
        while time.perf_counter() < end_s or len(latencies_ns) + errors < MIN_CALLS:
            start_ns = time.perf_counter_ns()
            try:
                await infer(payload, timeout=REQUEST_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                errors += 1
                progress(f"call failed: {exc.code().name}: {exc.details()}")
                continue
            latencies_ns.append(time.perf_counter_ns() - start_ns)
    return latencies_ns, errors


def measure_size(
    target: str, model: ModelInfo, size_mib: float, config: BenchConfig, pids: Sequence[int]
) -> SizeFigures:
    array = image(size_mib)
    request = pb.ModelInferRequest(model_name=model.name)
    request.inputs.add(name=model.inputs[0].name, datatype="FP32", shape=array.shape)
    request.raw_input_contents.append(array.tobytes())
    raw_ms = raw_p50_ms(model, array, MIN_CALLS * 4)
    roles = role_pids(pids)
    before = {role: rss_kib(found) for role, found in roles.items()}
    reset_peaks(pids)
    latencies_ns, errors = asyncio.run(mesh_calls(target, request, config))
    peaks = {role: peak_kib(found) for role, found in roles.items()}
    echo_ms = asyncio.run(echo_p50_ms(request.SerializeToString(), MIN_CALLS))
    figures = SizeFigures(
        size_mib,
        array.nbytes,
        len(latencies_ns),
        errors,
        percentile_ms(latencies_ns, 50),
        percentile_ms(latencies_ns, 99),
        raw_ms,
        before,
        peaks,
        echo_ms,
    )
    progress(
        f"{size_mib:g} MiB: p50 {figures.p50_ms:.1f} ms (raw {raw_ms:.1f} ms, gRPC echo {echo_ms:.1f} ms),"
        f" peaks {peaks} KiB"
    )
    return figures


def run_large(config: BenchConfig) -> dict[str, Any]:
    """Start a mesh on a Redis of its own (or use ``--target``; memory is then not
    measured) and measure each size; every figure, as JSON."""
    model = find_model(config.repository, MODEL)
    limit = int(max(config.sizes_mib) * MIB * 1.25) + MIB
    with contextlib.ExitStack() as stack:
        target = config.target
        if target is None:
            redis_url = stack.enter_context(RedisServer(binary_from_env())).socket_url
            config = replace(config, redis_url=redis_url)
            up_args = ["--redis-url", redis_url, "--max-message-bytes", str(limit)]
            target = stack.enter_context(own_mesh(config.repository, up_args))
        asyncio.run(require_ready(target, model))
        pids = [] if config.target else descendants(os.getpid())
        sizes = [measure_size(target, model, size, config, pids) for size in config.sizes_mib]
    return {
        "settings": asdict(config),
        "model": model_json(model),
        "sizes": [
            {**asdict(s), "added_p50_ms": s.added_p50_ms(), "peak_over_payload": s.peak_over_payload()} for s in sizes
        ],
    }
