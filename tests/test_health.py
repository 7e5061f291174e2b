"""A model's health: the sanity check before it is ready, and the canary that takes it
out of service when it starts answering NaN (or failing) and brings it back when it
recovers. The broken model is a real ONNX model, run by a real ONNX Runtime session
swapped in for the served one."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper, numpy_helper
from redis.asyncio import Redis

from meshserve.devkit.examples import write_example_repository
from meshserve.models.repository import load_model
from model_workers.server import WorkerServer
from model_workers.session import LoadedModel, SanityCheckFailed
from protos import grpc_service_pb2 as pb
from tests.support import infer_request, infer_stub, output_arrays, start_mesh, stop_mesh, wait_view
from tests.test_resilience import write_gather_model

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
CANARY_INTERVAL_S = 0.05


def write_nan_mlp(path: Path) -> Path:
    """A model with the example "mlp"'s signature whose every output is NaN.

    features FP32 [batch, 64] -> MatMul by a NaN matrix -> logits [batch, 10] -> Softmax
    -> probabilities: what a model whose weights went bad looks like.
    """
    weights = numpy_helper.from_array(np.full((64, 10), np.nan, np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        "nan_mlp",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 64])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10]),
        ],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def nan_session(tmp_path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(write_nan_mlp(tmp_path / "nan" / "model.onnx")), providers=["CPUExecutionProvider"])


# ------------------------------------------------------------ the sanity check


def test_warm_up_refuses_a_model_that_answers_nan(tmp_path: Path) -> None:
    write_nan_mlp(tmp_path / "mlp" / "1" / "model.onnx")
    model = LoadedModel(load_model(tmp_path / "mlp", 1))
    with pytest.raises(SanityCheckFailed, match=r"output 'logits' has 10 non-finite values \(NaN or Inf\) of 10"):
        model.warm_up()
    assert not model.ready


def test_the_canary_checks_the_sample_input_answer(model_repository: Path, tmp_path: Path) -> None:
    model = LoadedModel(load_model(model_repository / "mlp", 1))
    model.warm_up()
    model.canary()  # a sane model passes
    model.session = nan_session(tmp_path)
    with pytest.raises(SanityCheckFailed, match="output 'logits'"):
        model.canary()


# ------------------------------------------------------------ the canary, in a mesh


async def next_status(watch: Any, wanted: int) -> None:
    """Until the health Watch stream reports ``wanted`` (it streams every change)."""
    async with asyncio.timeout(10):
        while (await watch.read()).status != wanted:
            pass


def readiness_changes(worker: WorkerServer) -> asyncio.Queue[dict[tuple[str, int], bool]]:
    """Every readiness change the worker signals, as a snapshot of its models' readiness."""
    changes: asyncio.Queue[dict[tuple[str, int], bool]] = asyncio.Queue()
    signal = worker.worker.on_readiness_change

    def observed() -> None:
        changes.put_nowait({key: s.model.ready for key, s in worker.worker.served.items()})
        signal()

    worker.worker.on_readiness_change = observed
    return changes


async def test_a_model_that_starts_answering_nan_flips_not_serving_and_back(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    repository = write_example_repository(tmp_path / "models", ["mlp", "cnn"])
    mesh = await start_mesh(redis_url, repository, worker_overrides={"canary_interval_s": CANARY_INTERVAL_S})
    worker = mesh.workers[0]
    mlp = worker.worker.served[("mlp", 1)].model
    cnn = worker.worker.served[("cnn", 1)].model
    features = {"features": np.ones((1, 64), np.float32)}
    try:
        async with (
            grpc.aio.insecure_channel(worker.health_address) as health_channel,
            grpc.aio.insecure_channel(mesh.address) as channel,
        ):
            health = health_pb2_grpc.HealthStub(health_channel)
            stub = infer_stub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service="mlp/1"))
            try:
                await next_status(watch, SERVING)
                good = mlp.session
                mlp.session = nan_session(tmp_path)  # the model starts answering NaN

                await next_status(watch, NOT_SERVING)
                await wait_view(mesh, lambda view: ("mlp", 1) not in view.ready)
                assert not (await stub.ModelReady(pb.ModelReadyRequest(name="mlp"), timeout=5)).ready
                started = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.ModelInfer(infer_request("mlp", features), timeout=5)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "model 'mlp' version 1 is not ready" in (refused.value.details() or "")
                assert time.monotonic() - started < 1  # refused at the gateway, never queued
                # the other model on the same worker keeps serving
                other = await stub.ModelInfer(infer_request("cnn", cnn.sample_inputs(1)), timeout=5)
                assert output_arrays(other)["logits"].shape == (1, 10)
                cnn_health = await health.Check(health_pb2.HealthCheckRequest(service="cnn/1"), timeout=5)
                assert cnn_health.status == SERVING

                mlp.session = good  # it recovers
                await next_status(watch, SERVING)
            finally:
                watch.cancel()
            await wait_view(mesh, lambda view: ("mlp", 1) in view.ready)
            assert (await stub.ModelReady(pb.ModelReadyRequest(name="mlp"), timeout=5)).ready
            response = await stub.ModelInfer(infer_request("mlp", features), timeout=5)
            assert np.isfinite(output_arrays(response)["logits"]).all()
    finally:
        await stop_mesh(mesh)


async def test_a_model_taken_out_by_failed_batches_comes_back_through_the_canary(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    repository = write_example_repository(tmp_path / "models", ["mlp"])
    write_gather_model(repository)  # fails on idx >= 8; the canary's sample input is in range
    mesh = await start_mesh(redis_url, repository, worker_overrides={"canary_interval_s": CANARY_INTERVAL_S})
    changes = readiness_changes(mesh.workers[0])
    bad = infer_request("lookup", {"idx": np.array([100], np.int64)})
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            for _ in range(3):
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await stub.ModelInfer(bad, timeout=5)
                assert failed.value.code() == grpc.StatusCode.INTERNAL
            async with asyncio.timeout(10):
                assert (await changes.get())[("lookup", 1)] is False  # three failures in a row
                assert (await changes.get())[("lookup", 1)] is True  # then a canary passed
            # The gateway may still hold a table from before the failures: see the
            # model leave the routing table, then come back, before calling it.
            await wait_view(mesh, lambda view: ("lookup", 1) not in view.ready)
            await wait_view(mesh, lambda view: ("lookup", 1) in view.ready)
            good = await stub.ModelInfer(infer_request("lookup", {"idx": np.array([3], np.int64)}), timeout=5)
            assert output_arrays(good)["value"].tolist() == [30.0]
    finally:
        await stop_mesh(mesh)


async def test_no_canary_runs_when_the_interval_is_zero(redis: Redis, redis_url: str, tmp_path: Path) -> None:
    repository = write_example_repository(tmp_path / "models", ["mlp"])
    mesh = await start_mesh(redis_url, repository, worker_overrides={"canary_interval_s": 0})
    try:
        canary = mesh.workers[0].tasks["canary"]
        async with asyncio.timeout(5):
            await canary  # returns at once: nothing to schedule
    finally:
        await stop_mesh(mesh)


async def test_a_canary_never_runs_beside_a_batch_run_on_the_event_loop_thread(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    """Quick models run their batches on the loop's thread while canaries run on the
    ONNX Runtime thread; the device lock keeps the two apart. Every run here takes
    2 ms (still quick), and a canary starts every millisecond, so without the lock
    most of these calls would run beside one."""
    repository = write_example_repository(tmp_path / "models", ["mlp"])
    mesh = await start_mesh(redis_url, repository, worker_overrides={"canary_interval_s": 0.001})
    model = mesh.workers[0].worker.served[("mlp", 1)].model
    session = model.session
    guard = threading.Lock()
    running = most = on_loop = 0
    loop_thread = threading.get_ident()

    class Slowed:
        """The real session, each run 3 ms longer, counting runs in progress."""

        def __getattr__(self, name: str) -> Any:
            return getattr(session, name)

        def run(self, *args: Any, **kwargs: Any) -> Any:
            nonlocal running, most, on_loop
            with guard:
                running += 1
                most = max(most, running)
                on_loop += threading.get_ident() == loop_thread
            try:
                time.sleep(0.002)
                return session.run(*args, **kwargs)
            finally:
                with guard:
                    running -= 1

    model.session = Slowed()  # type: ignore[assignment]
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            for value in range(40):
                features = {"features": np.full((1, 64), value, np.float32)}
                await stub.ModelInfer(infer_request("mlp", features), timeout=5)
    finally:
        await stop_mesh(mesh)

    assert on_loop > 0  # batches did run on the loop's thread (all but the first, unless the machine stalls)
    assert most == 1
