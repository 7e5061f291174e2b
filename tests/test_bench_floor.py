"""The bench's gRPC floor (meshserve_bench/floor.py): a bare grpc.aio server answering
every method as the gateway serves ModelInfer, at the mesh point's pace, and the report's
gateway CPU over it."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from meshserve.devkit.examples import write_example_repository
from meshserve.devkit.redis_server import free_port
from meshserve.models.repository import load_model
from meshserve_bench import report, scenarios
from meshserve_bench.config import BenchConfig
from meshserve_bench.floor import pace_delay_ms, running
from meshserve_bench.load import build_request
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def cnn_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_example_repository(tmp_path_factory.mktemp("models"), ["cnn"]) / "cnn"


async def test_the_floor_answers_model_infer_with_an_empty_response(cnn_dir: Path) -> None:
    port = free_port()
    async with running(port, delay_s=0.0), grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        reply = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            build_request(load_model(cnn_dir, 1)), timeout=10
        )
    assert reply == pb.ModelInferResponse()


def test_the_pace_is_the_closed_loops_time_per_call() -> None:
    assert pace_delay_ms(32, 500.0) == pytest.approx(64.0)
    assert pace_delay_ms(1, 250.0) == pytest.approx(4.0)
    assert pace_delay_ms(32, 0.0) == 0.0  # a point that answered nothing: no pace to keep


def test_the_floor_runs_each_point_at_its_pace_in_a_process_of_its_own(cnn_dir: Path) -> None:
    config = BenchConfig(
        scenario="sweep", target=None, model="cnn", repository=cnn_dir.parent, duration_s=0.5, warmup_s=0.1
    )
    mesh_points = [{"offered": 4, "ok_per_s": 200.0, "cpu_us_per_request": {"gateway": 700.0}}]
    floor = scenarios.load_floor(mesh_points, load_model(cnn_dir, 1), replace(config, channels=2))
    (point,) = floor
    assert point["delay_ms"] == pytest.approx(20.0)  # 4 clients at 200 calls/s
    assert point["calls"]["ok"] > 0
    assert not point["calls"]["errors"]
    assert point["calls"]["p50_ms"] >= 20.0  # each answer waited for the pace
    if "grpc_floor" in point["cpu_us_per_request"]:  # CPU ticks are 10 ms: a short window may see none
        scenarios.beside_floor(mesh_points, floor)
        assert mesh_points[0]["gateway_over_floor_us_per_request"] == pytest.approx(
            700.0 - point["cpu_us_per_request"]["grpc_floor"]
        )


def test_the_report_states_the_gateway_over_the_floor() -> None:
    points = [{"offered": 32, "ok_per_s": 500.0, "calls": {"p50_ms": 64.0}, "cpu_us_per_request": {"gateway": 700.0}}]
    floor = [{"offered": 32, "ok_per_s": 495.0, "cpu_us_per_request": {"grpc_floor": 320.0}, "delay_ms": 64.0}]
    scenarios.beside_floor(points, floor)
    assert points[0]["gateway_over_floor_us_per_request"] == pytest.approx(380.0)
    lines = "\n".join(report.hops_lines({"points": points}))
    assert "| 320 | 380 |" in lines
    assert "the gateway spends 700 µs of CPU per request, a bare grpc.aio server answering at the same pace" in lines
    assert "320 µs per call (the gRPC floor): 380 µs are the gateway's own" in lines


def test_a_floor_point_without_cpu_leaves_the_mesh_point_as_it_was() -> None:
    points = [{"offered": 32, "ok_per_s": 500.0, "cpu_us_per_request": {"gateway": 700.0}}]
    scenarios.beside_floor(points, [{"offered": 32, "cpu_us_per_request": {}}])
    assert "grpc_floor_cpu_us_per_request" not in points[0]
    assert "gateway_over_floor_us_per_request" not in points[0]
