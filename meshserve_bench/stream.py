"""``--scenario stream``: ModelStreamInfer beside unary ModelInfer, and the response
cache's hit beside a miss (issue 19).

The bench starts its own mesh on a copy of the repository in which the model has a
twin, ``<model>_cached``, with ``response_cache: true``. Rates and latencies:

- ``unary``: ``concurrency`` closed-loop clients over one channel, each sending a
  ModelInfer as soon as its last came back;
- ``stream``: one ModelStreamInfer stream that keeps ``concurrency`` requests in
  flight (a new one sent as each answer arrives), each timed by its id;

at concurrency 1 and 16 (``--concurrency`` is not read here). Then the cache, one
call at a time: a miss (every request's inputs new) against a hit (one request sent
again), on the caching twin. Then generation on the example generator, added to the
copy (tokens per second and time to first token, ``meshserve_bench/generation.py``).
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

from meshserve.devkit.examples import write_example_repository
from meshserve.models.repository import ModelInfo
from meshserve_bench.config import BenchConfig
from meshserve_bench.generation import GENERATION_CONCURRENCIES, GENERATOR, generation_point
from meshserve_bench.load import OK, CallFigures, Tally, Window, build_request, random_inputs
from meshserve_bench.mesh import find_model, model_json, own_mesh, progress, require_ready
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc

STREAM_CONCURRENCIES = (1, 16)
CACHE_CALLS = 300  # calls timed for the hit and for the miss
CALL_TIMEOUT_S = 30.0
CACHED_SUFFIX = "_cached"


@dataclass(frozen=True, slots=True)
class RatePoint:
    """One mode at one concurrency: OK calls per second inside the window, and their latency."""

    mode: str  # "unary" or "stream"
    concurrency: int
    calls_per_s: float
    calls: CallFigures


def caching_repository(source: Path, model: str, into: Path) -> Path:
    """A copy of ``source`` with ``<model>_cached``: the model again, with ``response_cache: true``."""
    repository = into / "models"
    shutil.copytree(source, repository)
    twin = repository / f"{model}{CACHED_SUFFIX}"
    shutil.copytree(repository / model, twin)
    config = twin / "config.yaml"
    text = config.read_text() if config.exists() else ""
    config.write_text(text + "\nresponse_cache: true\n")
    if not (repository / GENERATOR).exists():
        write_example_repository(repository, [GENERATOR])
    return repository


async def unary_point(
    stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest, concurrency: int, window: Window
) -> RatePoint:
    tally = Tally(window)

    async def client() -> None:
        while time.perf_counter_ns() < window.end_ns:
            start_ns = time.perf_counter_ns()
            try:
                await stub.ModelInfer(request, timeout=CALL_TIMEOUT_S)
                code, details = OK, ""
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code().name, str(exc.details())
            tally.record(code, details, start_ns, time.perf_counter_ns())

    await asyncio.gather(*(client() for _ in range(concurrency)))
    figures = tally.figures()
    return RatePoint("unary", concurrency, figures.ok / window.duration_s(), figures)


async def stream_point(
    stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest, concurrency: int, window: Window
) -> RatePoint:
    tally = Tally(window)
    call = stub.ModelStreamInfer(timeout=CALL_TIMEOUT_S + window.duration_s() + 60)
    sent: dict[str, int] = {}
    ids = itertools.count()
    body = request.SerializeToString()

    async def send() -> None:
        one = pb.ModelInferRequest.FromString(body)
        one.id = str(next(ids))
        sent[one.id] = time.perf_counter_ns()
        await call.write(one)

    for _ in range(concurrency):
        await send()
    while sent:
        response = await call.read()
        if response is grpc.aio.EOF:
            break
        now_ns = time.perf_counter_ns()
        start_ns = sent.pop(response.infer_response.id)
        failed = response.error_message
        tally.record("ERROR" if failed else OK, failed, start_ns, now_ns)
        if now_ns < window.end_ns:
            await send()
    await call.done_writing()
    figures = tally.figures()
    return RatePoint("stream", concurrency, figures.ok / window.duration_s(), figures)


async def cache_figures(stub: pb_grpc.GRPCInferenceServiceStub, model: ModelInfo) -> dict[str, tuple[CallFigures, int]]:
    """One call at a time on the caching twin: CACHE_CALLS misses, then CACHE_CALLS hits;
    each with how many answers said ``cached``."""
    name = f"{model.name}{CACHED_SUFFIX}"

    def request(seed: int) -> pb.ModelInferRequest:
        built = pb.ModelInferRequest(model_name=name)
        for tensor, array in zip(model.inputs, random_inputs(model, 1, seed).values(), strict=True):
            built.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=array.shape)
            built.raw_input_contents.append(array.tobytes())
        return built

    async def timed(requests: list[pb.ModelInferRequest]) -> tuple[CallFigures, int]:
        tally, cached = Tally(Window(0, 2**63 - 1)), 0
        for one in requests:
            start_ns = time.perf_counter_ns()
            response = await stub.ModelInfer(one, timeout=CALL_TIMEOUT_S)
            tally.record(OK, "", start_ns, time.perf_counter_ns())
            cached += "cached" in response.parameters
        return tally.figures(), cached

    misses, missed_cached = await timed([request(1000 + i) for i in range(CACHE_CALLS)])
    hit = request(1)
    await stub.ModelInfer(hit, timeout=CALL_TIMEOUT_S)  # the entry is stored in the background
    for _ in range(20):  # until the stored entry answers
        if "cached" in (await stub.ModelInfer(hit, timeout=CALL_TIMEOUT_S)).parameters:
            break
    hits, hit_cached = await timed([hit] * CACHE_CALLS)
    return {"miss": (misses, missed_cached), "hit": (hits, hit_cached)}


async def measure(target: str, model: ModelInfo, config: BenchConfig) -> dict[str, Any]:
    await require_ready(target, model)
    request = build_request(model)
    points: list[RatePoint] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for concurrency in STREAM_CONCURRENCIES:
            for mode, point in (("unary", unary_point), ("stream", stream_point)):
                progress(f"{mode} at concurrency {concurrency}")
                window = Window.after(config.warmup_s, config.duration_s)
                points.append(await point(stub, request, concurrency, window))
        progress("cache: misses, then hits")
        cache = await cache_figures(stub, model)
        generation = []
        for concurrency in GENERATION_CONCURRENCIES:
            progress(f"generation at concurrency {concurrency}")
            window = Window.after(config.warmup_s, config.duration_s)
            generation.append(asdict(await generation_point(stub, concurrency, window)))
    return {
        "generation_points": generation,
        "stream_points": [asdict(point) for point in points],
        "cache": {kind: {**asdict(figures), "cached": cached} for kind, (figures, cached) in cache.items()},
    }


def run_stream(config: BenchConfig) -> dict[str, Any]:
    """Start a mesh on a repository with the caching twin; every figure, as JSON."""
    if config.target:
        raise SystemExit("bench: --scenario stream starts its own mesh (it adds a caching twin of the model)")
    model = find_model(config.repository, config.model)
    with tempfile.TemporaryDirectory(prefix="meshserve-bench-stream-") as tmp:
        repository = caching_repository(config.repository, config.model, Path(tmp))
        with own_mesh(repository) as target:
            figures = asyncio.run(measure(target, model, config))
    return {"settings": asdict(config), "model": model_json(model), **figures}
