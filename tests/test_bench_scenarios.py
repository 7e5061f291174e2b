"""``meshserve bench`` against real parts: closed and open loops on the in-process mesh
with Redis's own counters, tenant A's flood in a spawned process, the mesh's memory from
/proc. Short windows and no timed assertion."""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from meshserve.devkit.redis_server import free_port
from meshserve_bench import scenarios, tenants
from meshserve_bench.load import Window, build_request, measure_point, process_cpu_s
from meshserve_bench.mesh import find_model, gateway_pid


async def test_closed_and_open_loop_against_the_mesh_with_redis_cost(
    mesh: Any, model_repository: Path, redis: Redis
) -> None:
    request = build_request(find_model(model_repository, "mlp"))
    closed = await measure_point(mesh.address, request, Window.after(0.0, 0.3), channels=2, concurrency=2)
    opened = await measure_point(
        mesh.address, request, Window.after(0.0, 0.5), channels=2, rate_per_s=20.0, timeout_s=10.0, redis=redis
    )
    for point in (closed, opened):
        assert point.calls.errors == {}
        assert point.calls.ok > 0
        assert point.client_cpu_s > 0
    assert closed.sent == closed.calls.ok
    assert closed.send_lag_p99_ms is None
    assert opened.sent > 0
    assert opened.send_lag_p99_ms is not None
    assert closed.redis is None
    assert opened.redis is not None
    figures = scenarios.point_json(opened, None)
    assert figures["redis_commands_per_call"] > 1  # every call enqueues, is taken, replied and acked


async def test_the_noisy_tenants_flood_runs_in_a_spawned_process(mesh: Any, model_repository: Path) -> None:
    request = build_request(find_model(model_repository, "mlp"))
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as flooder:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(flooder, tenants.warm_flooder)
        flood = tenants.Flood(40.0, 2)
        plan = tenants.FloodPlan(mesh.address, request.SerializeToString(), (), flood, Window.after(0.1, 1.0))
        point = await loop.run_in_executor(flooder, tenants.flood_process, plan)
    assert point.calls.ok > 0
    assert point.calls.errors == {}  # the open development tenant: nothing refused
    assert point.client_cpu_s > 0  # the child's own CPU, not this process's


async def test_a_retrying_client_pauses_after_each_failed_call(mesh: Any, model_repository: Path) -> None:
    request = build_request(find_model(model_repository, "mlp"))
    request.model_name = "no_such_model"  # every call fails at once, NOT_FOUND
    window = Window.after(0.0, 0.5)
    point = await measure_point(mesh.address, request, window, channels=2, concurrency=2, pause_after_error_s=0.1)
    assert point.calls.ok == 0
    # two clients, a call then 100 ms of pause: at most 6 calls each end inside 0.5 s
    assert 0 < point.calls.errors["NOT_FOUND"] <= 12


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_descendants_and_rss_from_proc() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert child.pid in scenarios.descendants(os.getpid())
        assert scenarios.rss_kib([os.getpid(), child.pid]) > scenarios.rss_kib([os.getpid()]) > 0
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)
    assert scenarios.rss_kib([child.pid]) == 0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_the_gateway_process_is_found_by_its_port_and_its_cpu_read() -> None:
    port = str(free_port())
    argv = [sys.executable, "-c", "import sys; print(flush=True); sys.stdin.read()", "gateway", "--grpc-port", port]
    child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        child.stdout.readline()  # it runs its own command line now (until exec, /proc shows pytest's)
        assert gateway_pid(f"127.0.0.1:{port}") == child.pid
        assert gateway_pid(f"127.0.0.1:{free_port()}") is None
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)
        assert child.stdout is not None
        child.stdout.close()
    assert process_cpu_s(child.pid) is None  # gone
    assert (process_cpu_s(os.getpid()) or 0.0) > 0


async def test_the_stream_scenarios_points_against_the_mesh(mesh: Any, model_repository: Path) -> None:
    import grpc

    from meshserve_bench import stream
    from protos import grpc_service_pb2_grpc as pb_grpc

    request = build_request(find_model(model_repository, "mlp"))
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        unary = await stream.unary_point(stub, request, 2, Window.after(0.0, 0.3))
        streamed = await stream.stream_point(stub, request, 4, Window.after(0.0, 0.3))
    for point in (unary, streamed):
        assert point.calls.errors == {}
        assert point.calls.ok > 0
        assert point.calls_per_s > 0
    assert streamed.mode == "stream"


def test_the_scale_out_copy_sets_the_partitions_and_keeps_the_rest(model_repository: Path, tmp_path: Path) -> None:
    from meshserve_bench import scale_out

    model = find_model(model_repository, "cnn")  # its config.yaml sets max_batch_size: 8
    copied = scale_out.partitioned_copy(model, model_repository, 3, tmp_path)
    served = find_model(copied, "cnn")
    assert (served.queue_partitions, served.max_batch_size) == (3, 8)
    assert sorted(p.name for p in copied.iterdir()) == ["cnn"]


async def test_the_scale_out_shard_reading_counts_a_nodes_cpu_and_commands(redis: Redis, redis_url: str) -> None:
    from meshserve_bench import scale_out

    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    cpu_before, commands_before = await scale_out.node_counters(redis)
    for i in range(200):
        await redis.set(f"k{i}", i)
    cpu_after, commands_after = await scale_out.node_counters(redis)
    assert cpu_after >= cpu_before
    assert commands_after - commands_before >= 200
    [(idle_cpu_s, idle_commands)] = await scale_out.shard_usage(Window.after(0.0, 0.05), [port])
    assert idle_cpu_s >= 0
    assert idle_commands == 0  # its own INFO commands are not counted
