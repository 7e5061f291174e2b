"""Readiness that means something: a model that fails to load is reported with its
reason (ModelReady false, its health entry NOT_SERVING, the router's log once, its
metrics and ``meshserve top``), and it does not make the rest of the mesh unready
unless the gateway is asked for strict readiness. A model with symbolic spatial dims
becomes ready in a mesh."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import generate_latest
from redis.asyncio import Redis

from gateway.routing import RoutingView
from meshserve.cli.top import build_view, render, take_snapshot
from meshserve.devkit.redis_server import free_port
from model_workers.assignment import LOAD_RETRY_FIRST_S, LOAD_RETRY_MAX_S, retry_delay_s
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from tests.support import Mesh, infer_request, infer_stub, output_arrays, start_mesh, stop_mesh
from tests.warmup_models import write_fixed_area_model, write_stride32_model

BROKEN = "broken"
TYPO = "typo"
BROKEN_CONFIG = "warmup:\n  - inputs:\n      image: {dims: [3, 32, 32]}\n"  # the Reshape needs H * W == 1000


def _repository(model_repository: Path, tmp_path: Path) -> Path:
    """The example models, a stride-32 detector, and a model whose configured warm-up fails."""
    repository = tmp_path / "models"
    shutil.copytree(model_repository, repository)
    write_stride32_model(repository)
    write_fixed_area_model(repository, BROKEN)
    (repository / BROKEN / "config.yaml").write_text(BROKEN_CONFIG)
    write_fixed_area_model(repository)  # no guessed size fits it: served without warm-up
    write_stride32_model(repository, TYPO)
    (repository / TYPO / "config.yaml").write_text("model_warmup: []\n")  # Triton's key: not ours
    return repository


async def _health(channel: grpc.aio.Channel, service: str) -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    return int(response.status)


async def _start(redis_url: str, repository: Path, **gateway: object) -> Mesh:
    return await start_mesh(
        redis_url, repository, until=RoutingView.settled, worker_overrides={"intra_op_threads": 1}, **gateway
    )


@pytest.mark.timeout(60)
async def test_a_model_that_fails_to_load_leaves_the_rest_ready(
    redis: Redis, redis_url: str, model_repository: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="router.core")
    mesh = await _start(redis_url, _repository(model_repository, tmp_path))
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
            assert not (await stub.ModelReady(pb.ModelReadyRequest(name=BROKEN))).ready  # not NOT_FOUND
            assert (await stub.ModelReady(pb.ModelReadyRequest(name="detector"))).ready
            assert (await stub.ModelReady(pb.ModelReadyRequest(name="area"))).ready
            assert not (await stub.ModelReady(pb.ModelReadyRequest(name=TYPO))).ready  # a bad config: known, failed
            serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
            assert await _health(channel, "") == serving
            assert await _health(channel, f"{BROKEN}/1") == not_serving
            assert await _health(channel, "detector/1") == serving
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ModelInfer(infer_request(BROKEN, {"image": np.ones((1, 3, 25, 40), np.float32)}), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "failed to load (Fail: [ONNXRuntimeError]" in str(refused.value.details())
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ModelInfer(infer_request(TYPO, {"image": np.ones((1, 3, 32, 32), np.float32)}), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "unknown key 'model_warmup'" in str(refused.value.details())
            # the detector (symbolic H and W, multiples of 32) serves what fits it
            image = np.ones((1, 3, 64, 96), dtype=np.float32)
            response = await stub.ModelInfer(infer_request("detector", {"image": image}), timeout=10)
            assert output_arrays(response)["features"].shape == (1, 6, 64, 96)
        for _ in range(3):  # more reports of the same failure: logged once all the same
            await mesh.workers[0].worker.reporter.report()
        logged = [
            r.getMessage() for r in caplog.records if r.name == "router.core" and "failed to load" in r.getMessage()
        ]
        assert len(logged) == 1, logged
        tried = [
            r for r in caplog.records if r.name == "model_workers.assignment" and "failed to load" in r.getMessage()
        ]
        assert len(tried) == 1  # not tried again at each report: after a backoff
        assert f"model {BROKEN} version 1" in logged[0]
        assert "Reshape" in logged[0]
        # the reason in the router's metrics, and so in `meshserve top`
        text = generate_latest(mesh.router.metrics.registry).decode()
        snapshot = take_snapshot(["router"], fetch=lambda url, timeout_s: text, clock=lambda: 1.0)
        view = build_view(snapshot, snapshot)
        (row,) = next(model for model in view.models if model.model == BROKEN).versions
        assert row.load_error is not None
        assert "Reshape" in row.load_error
        assert _rendered(view).count(f"failed to load: {BROKEN} version 1: ") == 1
    finally:
        await stop_mesh(mesh)


def _rendered(view: object) -> str:
    from rich.console import Console

    console = Console(width=400, record=True, file=open("/dev/null", "w"))  # noqa: SIM115 (closed with the console)
    console.print(render(view))  # type: ignore[arg-type]
    text = console.export_text()
    console.file.close()
    return text


@pytest.mark.timeout(60)
async def test_strict_readiness_says_not_ready_while_a_model_failed(
    redis: Redis, redis_url: str, model_repository: Path, tmp_path: Path
) -> None:
    mesh = await _start(redis_url, _repository(model_repository, tmp_path), strict_readiness=True)
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            assert not (await stub.ServerReady(pb.ServerReadyRequest())).ready
            assert await _health(channel, "") == health_pb2.HealthCheckResponse.NOT_SERVING
            assert (await stub.ModelReady(pb.ModelReadyRequest(name="detector"))).ready
    finally:
        await stop_mesh(mesh)


def test_a_failed_load_is_retried_with_a_bounded_backoff() -> None:
    delays = [retry_delay_s(failures) for failures in range(1, 12)]
    assert delays[0] == LOAD_RETRY_FIRST_S
    assert delays[1] == 2 * LOAD_RETRY_FIRST_S
    assert delays == sorted(delays)
    assert delays[-1] == LOAD_RETRY_MAX_S


@pytest.mark.timeout(60)
def test_up_names_the_models_that_failed_and_stays_up(redis_url: str, model_repository: Path, tmp_path: Path) -> None:
    repository = _repository(model_repository, tmp_path)
    port = free_port()
    args = ["--model-repository", str(repository), "--redis-url", redis_url, "--grpc-port", str(port)]
    args += ["--metrics-port", "0", "--host", "127.0.0.1", "--workers", "1", "--gpu-workers", "none"]
    args += ["--intra-op-threads", "1", "--canary-interval-s", "0"]
    log_path = tmp_path / "up.log"
    with log_path.open("w") as log:
        up = subprocess.Popen(
            [sys.executable, "-m", "meshserve", "up", *args],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            start_new_session=True,
        )
    try:
        assert up.stdout is not None
        line = ""
        while "meshserve ready" not in line:  # bounded by the test's timeout
            line = up.stdout.readline()
            assert line, f"meshserve up exited before it was ready:\n{log_path.read_text()}"
        assert f"2 failed to load: {BROKEN} version 1, {TYPO} version 1" in line
        assert "detector" in line
        reason = up.stdout.readline()
        assert reason.startswith(f"  {BROKEN} version 1: ")
        assert "Reshape" in reason
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            ready = infer_stub_sync(channel).ModelReady(pb.ModelReadyRequest(name="detector"), timeout=10)
            assert ready.ready
        assert up.poll() is None  # still up, serving the rest
        os.killpg(up.pid, signal.SIGINT)
        assert up.wait(30) == 0
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
        up.wait()
        if up.stdout is not None:
            up.stdout.close()


def infer_stub_sync(channel: grpc.Channel) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(channel)
