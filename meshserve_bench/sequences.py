"""``--scenario sequences``: steps of stateful models per second, and what a step costs
over a stateless call of the same computation (issue 22).

The bench starts its own mesh on a repository of two models built from one graph
(meshserve/devkit/accumulator.py): ``accumulator``, with ``sequence:`` (its state
read from Redis with the claim and written with the reply), and
``accumulator_stateless``, without (the client sends the state itself). Then:

- one call at a time: a stateless call against a step (p50/p99, and the difference:
  the latency a step adds: the gateway's admission round trip, the state in the
  claim and in the reply script);
- at each of 1, 16 and 64 clients (``--concurrency`` is not read here): every client
  runs sequences of ``STEPS_PER_SEQUENCE`` steps back to back (steps per second),
  beside the same number of clients making stateless calls (calls per second).
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx

from meshserve.devkit.accumulator import build_accumulator, write_accumulator
from meshserve_bench.config import BenchConfig
from meshserve_bench.load import OK, CallFigures, Tally, Window
from meshserve_bench.mesh import own_mesh, progress
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc

STATEFUL = "accumulator"
STATELESS = "accumulator_stateless"
CLIENTS = (1, 16, 64)
STEPS_PER_SEQUENCE = 20
SINGLE_CALLS = 300  # timed one at a time, for each kind
CALL_TIMEOUT_S = 30.0

Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class SequencePoint:
    """One kind of call at one number of clients: OK calls per second in the window."""

    kind: str  # "step" or "stateless"
    clients: int
    calls_per_s: float
    calls: CallFigures


def bench_repository(into: Path) -> Path:
    """The two models: the accumulator, and the same graph without ``sequence:``."""
    root = into / "models"
    write_accumulator(root, STATEFUL, max_sequences=0)
    # the stateless twin: the same graph, no sequence: (every input is the client's)
    (root / STATELESS / "1").mkdir(parents=True)
    onnx.save(build_accumulator(), str(root / STATELESS / "1" / "model.onnx"))
    (root / STATELESS / "config.yaml").write_text("max_batch_size: 8\ndynamic_batching: {max_queue_delay_ms: 0}\n")
    return root


def stateless_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=STATELESS)
    for name, datatype, array in (
        ("x", "INT64", np.ones((1, 1), np.int64)),
        ("state_in", "INT64", np.zeros((1, 1), np.int64)),
        ("START", "INT32", np.zeros((1, 1), np.int32)),
        ("CORRID", "INT64", np.zeros((1, 1), np.int64)),
    ):
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
    request.outputs.add(name="sum")
    return request


def step_request(sequence_id: int, index: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=STATEFUL)
    request.inputs.add(name="x", datatype="INT64", shape=[1, 1])
    request.raw_input_contents.append(np.ones((1, 1), np.int64).tobytes())
    request.outputs.add(name="sum")
    request.parameters["sequence_id"].int64_param = sequence_id
    request.parameters["sequence_start"].bool_param = index == 0
    request.parameters["sequence_end"].bool_param = index == STEPS_PER_SEQUENCE - 1
    return request


async def timed_call(
    stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest, tally: Tally, metadata: Metadata = ()
) -> None:
    start_ns = time.perf_counter_ns()
    try:
        await stub.ModelInfer(request, timeout=CALL_TIMEOUT_S, metadata=metadata)
        code, details = OK, ""
    except grpc.aio.AioRpcError as exc:
        code, details = exc.code().name, str(exc.details())
    tally.record(code, details, start_ns, time.perf_counter_ns())


async def one_at_a_time(stub: pb_grpc.GRPCInferenceServiceStub) -> dict[str, CallFigures]:
    figures = {}
    stateless, steps = Tally(Window(0, 2**63 - 1)), Tally(Window(0, 2**63 - 1))
    for _ in range(SINGLE_CALLS):
        await timed_call(stub, stateless_request(), stateless)
    ids = itertools.count(1)
    sequence_id, index = next(ids), 0
    for _ in range(SINGLE_CALLS):
        await timed_call(stub, step_request(sequence_id, index), steps)
        index += 1
        if index == STEPS_PER_SEQUENCE:
            sequence_id, index = next(ids), 0
    figures["stateless"], figures["step"] = stateless.figures(), steps.figures()
    return figures


async def point(
    stub: pb_grpc.GRPCInferenceServiceStub, kind: str, clients: int, window: Window, metadata: Metadata = ()
) -> SequencePoint:
    """``clients`` closed-loop clients of ``kind`` ("step": each runs sequences back to
    back; "stateless") inside ``window``; ``metadata``: the calls' (an API key)."""
    tally = Tally(window)
    ids = itertools.count(1_000_000 * clients)

    async def client() -> None:
        while time.perf_counter_ns() < window.end_ns:
            if kind == "stateless":
                await timed_call(stub, stateless_request(), tally, metadata)
                continue
            sequence_id = next(ids)
            for index in range(STEPS_PER_SEQUENCE):
                await timed_call(stub, step_request(sequence_id, index), tally, metadata)

    await asyncio.gather(*(client() for _ in range(clients)))
    figures = tally.figures()
    return SequencePoint(kind, clients, figures.ok / window.duration_s(), figures)


async def measure(target: str, config: BenchConfig) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        progress("one call at a time: stateless, then steps")
        single = await one_at_a_time(stub)
        points = []
        for clients in CLIENTS:
            for kind in ("stateless", "step"):
                progress(f"{kind} at {clients} clients")
                points.append(await point(stub, kind, clients, Window.after(config.warmup_s, config.duration_s)))
    return {
        "single": {kind: asdict(figures) for kind, figures in single.items()},
        "sequence_points": [asdict(p) for p in points],
    }


def run_sequences(config: BenchConfig) -> dict[str, Any]:
    """Start a mesh on the two models; every figure, as JSON."""
    if config.target:
        raise SystemExit("bench: --scenario sequences starts its own mesh (it writes its own two models)")
    with (
        tempfile.TemporaryDirectory(prefix="meshserve-bench-sequences-") as tmp,
        own_mesh(bench_repository(Path(tmp))) as target,
    ):
        figures = asyncio.run(measure(target, config))
    model = {"name": STATEFUL, "version": 1}
    return {"settings": asdict(config), "model": model, **figures}
