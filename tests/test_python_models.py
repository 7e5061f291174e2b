"""Python models through the whole mesh: each instance a process of its own, tensors
in shared memory, failures confined to the batch and the process that met them
(model_workers/python_runner.py; docs/models.md "Python models")."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from redis.asyncio import Redis

from gateway.routing import RoutingView
from meshserve.devkit.examples import write_example_repository, write_python_examples
from meshserve_bench.python_hop import measure
from protos import grpc_service_pb2 as pb
from tests.python_models import write_doubler
from tests.support import (
    hold_serving,
    infer_request,
    infer_stub,
    output_arrays,
    release_serving,
    start_mesh,
    stop_mesh,
    wait_queued,
)

ALLOWED = {"allow_python_models": True}


def _x(*first: int) -> np.ndarray:
    """One row per value: [v, 1, 2, 3]."""
    return np.array([[value, 1, 2, 3] for value in first], np.int32)


async def test_a_python_model_answers_through_the_gateway(redis: Redis, redis_url: str, tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    write_doubler(repository)
    mesh = await start_mesh(redis_url, repository, worker_overrides=ALLOWED)
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            reply = await stub.ModelInfer(infer_request("doubler", {"x": _x(5, 6)}), timeout=10)
            out = output_arrays(reply)
            assert out["y"].tolist() == [[10, 2, 4, 6], [12, 2, 4, 6]]
            metadata = await stub.ModelMetadata(pb.ModelMetadataRequest(name="doubler"), timeout=5)
            assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("x", "INT32", [-1, 4])]
            config = (await stub.ModelConfig(pb.ModelConfigRequest(name="doubler"), timeout=5)).config
            assert (config.backend, config.platform, config.max_batch_size) == ("python", "", 8)
            assert [(t.name, list(t.dims)) for t in config.output] == [("y", [4]), ("rows", [1])]
    finally:
        await stop_mesh(mesh)


async def test_concurrent_calls_run_in_one_execute(redis: Redis, redis_url: str, tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    write_doubler(repository, delay_ms=200)
    mesh = await start_mesh(redis_url, repository, worker_overrides=ALLOWED)
    try:
        await hold_serving(mesh.workers[0])
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            calls = [
                asyncio.ensure_future(stub.ModelInfer(infer_request("doubler", {"x": _x(value)}), timeout=10))
                for value in range(4)
            ]
            await wait_queued(redis, "doubler", 4)
            release_serving(mesh.workers[0])
            replies = [output_arrays(reply) for reply in await asyncio.gather(*calls)]
        assert [out["y"][0, 0] for out in replies] == [0, 2, 4, 6]  # each call its own rows back
        assert [out["rows"][0, 0] for out in replies] == [4, 4, 4, 4]  # one execute saw all four
    finally:
        await stop_mesh(mesh)


async def test_an_exception_names_the_model_and_its_type_not_the_traceback(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    repository = tmp_path / "repo"
    write_doubler(repository)
    mesh = await start_mesh(redis_url, repository, worker_overrides=ALLOWED)
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await stub.ModelInfer(infer_request("doubler", {"x": _x(-1)}), timeout=10)
            assert failed.value.code() == grpc.StatusCode.INTERNAL
            details = failed.value.details() or ""
            assert "model 'doubler'" in details
            assert "ValueError: x[0] is -1" in details
            assert "Traceback" not in details
            assert "model.py" not in details
            reply = await stub.ModelInfer(infer_request("doubler", {"x": _x(1)}), timeout=10)
            assert output_arrays(reply)["y"][0, 0] == 2  # the same process answers on
    finally:
        await stop_mesh(mesh)


async def test_a_crash_fails_its_batch_unavailable_and_a_fresh_process_serves_while_onnx_goes_on(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    repository = write_example_repository(tmp_path, ["mlp"])
    write_doubler(repository)
    mesh = await start_mesh(redis_url, repository, worker_overrides=ALLOWED)
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as crashed:
                await stub.ModelInfer(infer_request("doubler", {"x": _x(-2)}), timeout=10)
            assert crashed.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "model 'doubler'" in (crashed.value.details() or "")
            assert "exit code 3" in (crashed.value.details() or "")
            onnx = await stub.ModelInfer(infer_request("mlp", {"features": np.ones((1, 64), np.float32)}), timeout=10)
            assert output_arrays(onnx)["logits"].shape == (1, 10)
            reply = await stub.ModelInfer(infer_request("doubler", {"x": _x(3)}), timeout=20)
            assert output_arrays(reply)["y"][0, 0] == 6
    finally:
        await stop_mesh(mesh)


async def test_a_run_past_the_execution_timeout_is_killed(redis: Redis, redis_url: str, tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    write_doubler(repository, timeout_ms=300)
    mesh = await start_mesh(redis_url, repository, worker_overrides=ALLOWED)
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as stopped:
                await stub.ModelInfer(infer_request("doubler", {"x": _x(-3)}), timeout=20)
            assert stopped.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "execution timeout of 300 ms" in (stopped.value.details() or "")
            reply = await stub.ModelInfer(infer_request("doubler", {"x": _x(4)}), timeout=20)
            assert output_arrays(reply)["y"][0, 0] == 8
    finally:
        await stop_mesh(mesh)


async def test_without_the_flag_a_python_model_is_unready_and_the_flag_is_named(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    repository = write_example_repository(tmp_path, ["mlp"])
    write_doubler(repository)
    mesh = await start_mesh(redis_url, repository, until=RoutingView.settled)
    try:
        view = mesh.gateway.routing.view
        assert ("doubler", 1) not in view.ready
        assert "--allow-python-models" in view.failed[("doubler", 1)]
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            ready = await stub.ModelReady(pb.ModelReadyRequest(name="doubler"), timeout=5)
            assert ready.ready is False
    finally:
        await stop_mesh(mesh)


def test_the_process_hop_bench_answers_each_size_through_the_model() -> None:
    figures = measure(4096, calls=5)  # raises when the model's answer is not its input
    assert figures.size_bytes == 4096
    assert figures.python_model_us > 0


async def test_the_normalize_example_scales_uint8_images_to_float32(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    repository = tmp_path / "repo"
    write_python_examples(repository, allowed=True)
    # settled, not all ready: the "classify" pipeline written beside it lacks its "cnn" here
    mesh = await start_mesh(redis_url, repository, worker_overrides=ALLOWED, until=RoutingView.settled)
    try:
        image = np.zeros((1, 4, 6, 3), np.uint8)
        image[..., 1] = 255
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            reply = await infer_stub(channel).ModelInfer(infer_request("normalize", {"image": image}), timeout=10)
        pixels = output_arrays(reply)["pixels"]
        assert pixels.shape == (1, 3, 4, 6)
        assert pixels[0, 1].min() == 1.0
        assert pixels[0, 0].max() == 0.0
    finally:
        await stop_mesh(mesh)
    write_python_examples(repository, allowed=False)
    assert not (repository / "normalize").exists()


async def test_an_exception_in_initialize_is_a_load_failure_with_its_type(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    repository = write_example_repository(tmp_path, ["mlp"])  # a ready model: the view settles
    write_doubler(repository)
    model_py = repository / "doubler" / "1" / "model.py"
    model_py.write_text(model_py.read_text().replace('self.name = config["model_name"]', 'raise OSError("no vocab")'))
    mesh = await start_mesh(redis_url, repository, worker_overrides=ALLOWED, until=RoutingView.settled)
    try:
        assert "OSError: no vocab" in mesh.gateway.routing.view.failed[("doubler", 1)]
    finally:
        await stop_mesh(mesh)


async def test_unloading_a_python_model_finalizes_and_ends_its_processes(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    repository = write_example_repository(tmp_path, ["mlp"])
    write_doubler(repository)
    router = {"model_control_mode": "explicit", "load_model": ("mlp", "doubler")}
    mesh = await start_mesh(redis_url, repository, worker_overrides=ALLOWED, router_overrides=router)
    marker = repository / "doubler" / "1" / "finalized"
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            await stub.ModelInfer(infer_request("doubler", {"x": _x(1)}), timeout=10)
            await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="doubler"), timeout=20)
        async with asyncio.timeout(10):
            while not marker.exists():  # noqa: ASYNC110 (bounded poll: finalize runs in another process)
                await asyncio.sleep(0.02)
        assert marker.read_text().strip().isdigit()
    finally:
        await stop_mesh(mesh)


async def test_a_python_step_then_an_onnx_model_in_one_ensemble_call(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    """The example pipeline "classify": uint8 images decoded and scaled by the Python
    "normalize" on the CPU, then the ONNX "cnn": one call, equal to both run in process."""
    repository = write_example_repository(tmp_path / "repo", ["cnn"])
    write_python_examples(repository, allowed=True)
    mesh = await start_mesh(redis_url, repository, worker_overrides=ALLOWED)
    try:
        images = np.random.default_rng(4).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            reply = await infer_stub(channel).ModelInfer(infer_request("classify", {"IMAGE": images}), timeout=20)
    finally:
        await stop_mesh(mesh)
    cnn = ort.InferenceSession(str(repository / "cnn" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    pixels = images.transpose(0, 3, 1, 2).astype(np.float32) * np.float32(1 / 255)
    (want,) = cnn.run(["logits"], {"image": pixels})
    assert list(output_arrays(reply)) == ["LOGITS"]
    np.testing.assert_allclose(output_arrays(reply)["LOGITS"], want, rtol=1e-5, atol=1e-5)
    write_python_examples(repository, allowed=False)
    assert not (repository / "classify").exists()
