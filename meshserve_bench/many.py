"""The ``many-models`` scenario: more models than memory, loaded on demand.

``MODELS`` copies of the example MLP, each with ``placement.memory_mb: 10`` in its
config.yaml, on one CPU worker whose ``--memory-budget-mb`` leaves room for
``ROOM`` of them (the router keeps 10 % headroom), and ``--min-residency-s``
``MIN_RESIDENCY_S``. ``CLIENTS`` closed-loop clients pick a model per call with
Zipf weights (exponent ``ZIPF_S``: a few hot models, a long tail), for
``--duration-s`` after ``--warmup-s``; each call has ``CALL_TIMEOUT_S``.

Before each call the client asks the gateway ModelReady: a *hit* is a call whose
model was ready (resident) then, a *miss* one whose model was evicted, and its
latency is the *cold-start wait* (the load on demand, the queue, the compute).
The figures: the hit ratio, the cold-start wait's p50/p99 beside the hits',
calls and errors by code. Always on a mesh the bench starts (``--target`` is
refused: the repository is the scenario's own).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from meshserve.devkit.examples import build_mlp
from meshserve.devkit.redis_server import RedisServer, binary_from_env
from meshserve_bench.config import BenchConfig
from meshserve_bench.load import percentile_ms
from meshserve_bench.mesh import own_mesh, progress
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc

MODELS = 30
ROOM = 10
MODEL_MB = 10
BUDGET_MB = 115  # ROOM models of MODEL_MB after the router's 10 % headroom, not ROOM + 1
MIN_RESIDENCY_S = 1.0
CLIENTS = 4
ZIPF_S = 1.0
CALL_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 2.0


@dataclass(slots=True)
class ManyModelsFigures:
    """Latencies in ms; hits: the model was resident when the call was sent."""

    calls: int = 0
    hits: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    cold_p50_ms: float = float("nan")
    cold_p99_ms: float = float("nan")
    hit_p50_ms: float = float("nan")
    hit_p99_ms: float = float("nan")

    def hit_ratio(self) -> float | None:
        return self.hits / self.calls if self.calls else None


def write_repository(root: Path) -> Path:
    """``MODELS`` copies of the MLP, named m00, m01, ..., each declaring MODEL_MB."""
    model = build_mlp().SerializeToString()
    for i in range(MODELS):
        version = root / f"m{i:02d}" / "1"
        version.mkdir(parents=True)
        (version / "model.onnx").write_bytes(model)
        (version.parent / "config.yaml").write_text(f"placement:\n  device: cpu\n  memory_mb: {MODEL_MB}\n")
    return root


def zipf_weights(count: int, exponent: float = ZIPF_S) -> np.ndarray[Any, Any]:
    weights: np.ndarray[Any, Any] = 1.0 / np.arange(1, count + 1, dtype=np.float64) ** exponent
    normalized: np.ndarray[Any, Any] = weights / weights.sum()
    return normalized


async def measure(target: str, config: BenchConfig, *, seed: int = 0) -> ManyModelsFigures:
    """Closed-loop clients over the models; only calls that start in the measured window count."""
    names = [f"m{i:02d}" for i in range(MODELS)]
    weights = zipf_weights(MODELS)
    features = np.ones((1, 64), np.float32)
    start_s = time.perf_counter() + config.warmup_s
    end_s = start_s + config.duration_s
    hits_ns: list[int] = []
    cold_ns: list[int] = []
    errors: Counter[str] = Counter()

    async def client(stub: pb_grpc.GRPCInferenceServiceStub, rng: np.random.Generator) -> None:
        while (now_s := time.perf_counter()) < end_s:
            name = names[int(rng.choice(MODELS, p=weights))]
            ready = await stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=READY_TIMEOUT_S)
            request = pb.ModelInferRequest(model_name=name)
            request.inputs.add(name="features", datatype="FP32", shape=features.shape)
            request.raw_input_contents.append(features.tobytes())
            sent_ns = time.perf_counter_ns()
            try:
                await stub.ModelInfer(request, timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                if now_s >= start_s:
                    if not errors[exc.code().name]:  # the first of each code, said once
                        progress(f"{name}: {exc.code().name}: {exc.details()}")
                    errors[exc.code().name] += 1
                continue
            if now_s >= start_s:
                (hits_ns if ready.ready else cold_ns).append(time.perf_counter_ns() - sent_ns)

    async with contextlib.AsyncExitStack() as stack:
        channels = [await stack.enter_async_context(grpc.aio.insecure_channel(target)) for _ in range(2)]
        stubs = [pb_grpc.GRPCInferenceServiceStub(channel) for channel in channels]
        rngs = np.random.default_rng(seed).spawn(CLIENTS)
        await asyncio.gather(*(client(stubs[i % len(stubs)], rngs[i]) for i in range(CLIENTS)))
    calls = len(hits_ns) + len(cold_ns) + sum(errors.values())
    return ManyModelsFigures(
        calls,
        len(hits_ns),
        dict(errors),
        percentile_ms(cold_ns, 50),
        percentile_ms(cold_ns, 99),
        percentile_ms(hits_ns, 50),
        percentile_ms(hits_ns, 99),
    )


def run_many_models(config: BenchConfig) -> dict[str, Any]:
    """Start the scenario's mesh on a Redis of its own, measure; every figure, as JSON."""
    if config.target is not None:
        raise SystemExit("bench: --scenario many-models starts its own mesh (its repository); drop --target")
    with contextlib.ExitStack() as stack:
        root = write_repository(Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="many-models-"))))
        redis_url = stack.enter_context(RedisServer(binary_from_env())).socket_url
        config = replace(config, redis_url=redis_url, repository=root)
        up_args = [
            "--redis-url",
            redis_url,
            "--gpu-workers",
            "none",
            "--workers",
            "1",
            "--memory-budget-mb",
            str(BUDGET_MB),
            "--min-residency-s",
            str(MIN_RESIDENCY_S),
            "--intra-op-threads",
            "1",
        ]
        target = stack.enter_context(own_mesh(root, up_args))
        progress(f"{MODELS} models, room for {ROOM}: {CLIENTS} clients for {config.duration_s:g} s")
        figures = asyncio.run(measure(target, config))
    return {
        "settings": asdict(config),
        "model": {"name": f"{MODELS} x mlp", "version": 1, "max_batch_size": 0},
        "many_models": {
            **asdict(figures),
            "hit_ratio": figures.hit_ratio(),
            "models": MODELS,
            "room": ROOM,
            "clients": CLIENTS,
            "zipf_s": ZIPF_S,
            "min_residency_s": MIN_RESIDENCY_S,
            "call_timeout_s": CALL_TIMEOUT_S,
        },
    }
