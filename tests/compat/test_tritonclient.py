"""The mesh as a user meets it: `meshserve up` in a subprocess, called with the
public tritonclient package (sync and asyncio), grpc.health.v1 and reflection.

This module runs in its own pytest process (see the Makefile): tritonclient's
protobuf symbols share names with the gateway's generated code.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.utils import InferenceServerException

from meshserve.devkit.examples import EXAMPLE_MODELS
from meshserve.devkit.redis_cluster import RedisCluster
from meshserve.devkit.redis_server import free_port, suite_binary_from_env
from tests.dtype_models import IDENTITY_DATATYPES, LOWERCASE, identity_name, write_dtype_repository

# Budgets within the 60 s per-test timeout, which counts the module fixture's start
# against the first test and its stop against the last (about 2 s each alone here).
READY_TIMEOUT_S = 40
STOP_TIMEOUT_S = 15
REQUEUED_CALL_TIMEOUT_S = 30  # the last test's call: a worker restart, then the call


@dataclass
class RunningMesh:
    address: str
    repository: Path
    proc: subprocess.Popen[str]


def _wait_for_ready_line(proc: subprocess.Popen[str]) -> str:
    """Read `meshserve up`'s stdout until its one ready line (or it dies)."""
    assert proc.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if not selector.select(timeout=deadline - time.monotonic()):
            break
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"meshserve up exited with {proc.wait()} before it was ready")
        if line.startswith("meshserve ready:"):
            return line
    raise RuntimeError("meshserve up printed no ready line in time")


@contextlib.contextmanager
def meshserve_up(repository: Path, models: int, extra: tuple[str, ...] = ()) -> Iterator[RunningMesh]:
    """`meshserve up` on ``repository`` (and ``extra`` flags) until the context ends (then SIGTERM, exit 0).
    MESHSERVE_TEST_REDIS_CLUSTER=1: on a loopback Redis Cluster of its own instead of its private Redis."""
    if os.environ.get("MESHSERVE_TEST_REDIS_CLUSTER") == "1":
        with (
            RedisCluster(suite_binary_from_env()) as cluster,
            meshserve_up_on(repository, models, (*extra, "--redis-url", cluster.url)) as running,
        ):
            yield running
        return
    with meshserve_up_on(repository, models, extra) as running:
        yield running


@contextlib.contextmanager
def meshserve_up_on(repository: Path, models: int, extra: tuple[str, ...]) -> Iterator[RunningMesh]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshserve",
            "up",
            "--model-repository",
            str(repository),
            "--grpc-port",
            str(port),
            "--metrics-port",
            str(free_port()),
            "--host",
            "127.0.0.1",
            *extra,
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "MESHSERVE_LOG_LEVEL": "WARNING"},
    )
    try:
        line = _wait_for_ready_line(proc)
        assert f"127.0.0.1:{port}" in line
        assert f"{models} models" in line
        yield RunningMesh(f"127.0.0.1:{port}", repository, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=STOP_TIMEOUT_S) == 0, "meshserve up did not shut down cleanly"
        assert proc.stdout is not None
        proc.stdout.close()


@pytest.fixture(scope="module")
def mesh(model_repository: Path) -> Iterator[RunningMesh]:
    with meshserve_up(model_repository, len(EXAMPLE_MODELS)) as running:
        yield running


@pytest.fixture(scope="module")
def dtype_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    """One Identity model per datatype and a string model (tests/dtype_models.py)."""
    repository = write_dtype_repository(tmp_path_factory.mktemp("dtypes"))
    with meshserve_up(repository, len(IDENTITY_DATATYPES) + 1) as running:
        yield running


def reference(repository: Path, model: str, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(repository / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return list(session.run(None, feed))


def test_health_and_metadata(mesh: RunningMesh) -> None:
    client = tc.InferenceServerClient(mesh.address)
    assert client.is_server_live()
    assert client.is_server_ready()
    for model in ("mlp", "cnn", "adder_fixed", "scale_any"):
        assert client.is_model_ready(model)
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "meshserve"
    meta = client.get_model_metadata("cnn", as_json=True)
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": ["-1", "3", "32", "32"]}]
    assert meta["versions"] == ["1"]
    config = client.get_model_config("mlp", as_json=True)["config"]
    assert config["max_batch_size"] == 32
    assert config["input"][0]["dims"] == ["64"]


def test_sync_infer_matches_onnxruntime(mesh: RunningMesh) -> None:
    client = tc.InferenceServerClient(mesh.address)
    image = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    inp = tc.InferInput("image", list(image.shape), "FP32")
    inp.set_data_from_numpy(image)
    result = client.infer("cnn", [inp], request_id="req-7", priority=1, timeout=5_000_000)
    assert result.get_response().id == "req-7"
    np.testing.assert_allclose(
        result.as_numpy("logits"), reference(mesh.repository, "cnn", {"image": image})[0], rtol=1e-5, atol=1e-5
    )
    # class_count (Triton's classification extension): the top k per row as
    # "value:index" (this cnn has no label file), ranked as numpy ranks ONNX Runtime's
    logits = reference(mesh.repository, "cnn", {"image": image})[0]
    ranked = client.infer("cnn", [inp], outputs=[tc.InferRequestedOutput("logits", class_count=2)])
    got = ranked.as_numpy("logits")
    assert got.shape == (3, 2)
    assert got.dtype == np.object_
    for row, texts in zip(logits, got, strict=True):
        order = np.argsort(-row, kind="stable")[:2]
        assert [t.decode() for t in texts] == [f"{float(row[i]):f}:{i}" for i in order]
    with pytest.raises(InferenceServerException) as refused:  # k <= 0: refused, not "off"
        client.infer("cnn", [inp], outputs=[tc.InferRequestedOutput("logits", class_count=-1)])
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "requested output 'logits'" in refused.value.message()
    assert "classification" in client.get_server_metadata().extensions


def test_fixed_batch_model_and_requested_outputs(mesh: RunningMesh) -> None:
    client = tc.InferenceServerClient(mesh.address)
    a = np.arange(4, dtype=np.int64).reshape(1, 4)
    b = np.full((1, 4), 10, dtype=np.int64)
    inputs = [tc.InferInput("a", [1, 4], "INT64"), tc.InferInput("b", [1, 4], "INT64")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client.infer("adder_fixed", inputs, outputs=[tc.InferRequestedOutput("diff")])
    np.testing.assert_array_equal(result.as_numpy("diff"), a - b)
    assert result.as_numpy("sum") is None


async def test_asyncio_client_concurrent(mesh: RunningMesh) -> None:
    client = tc_aio.InferenceServerClient(mesh.address)
    try:
        rng = np.random.default_rng(2)
        batches = [rng.standard_normal((1 + i % 3, 64)).astype(np.float32) for i in range(16)]

        async def one(x: np.ndarray) -> np.ndarray:
            inp = tc.InferInput("features", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            return (await client.infer("mlp", [inp])).as_numpy("probabilities")

        results = await asyncio.gather(*(one(x) for x in batches))
        for x, got in zip(batches, results, strict=True):
            want = reference(mesh.repository, "mlp", {"features": x})[1]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    finally:
        await client.close()


def test_errors_carry_grpc_status(mesh: RunningMesh) -> None:
    client = tc.InferenceServerClient(mesh.address)
    x = np.zeros((1, 64), dtype=np.float64)
    inp = tc.InferInput("features", [1, 64], "FP64")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as wrong_dtype:
        client.infer("mlp", [inp])
    assert wrong_dtype.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input 'features': expected FP32, got FP64" in wrong_dtype.value.message()
    with pytest.raises(InferenceServerException) as unknown:
        client.infer("no_such_model", [inp])
    assert unknown.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as unimplemented:
        client.get_trace_settings()
    assert unimplemented.value.status() == "StatusCode.UNIMPLEMENTED"


def test_statistics_as_tritonclient_reads_them(mesh: RunningMesh) -> None:
    """The wire of ModelStatistics (exact counts: tests/test_statistics.py, in process)."""
    client = tc.InferenceServerClient(mesh.address)
    before = client.get_inference_statistics("mlp").model_stats
    x = np.ones((2, 64), dtype=np.float32)
    inp = tc.InferInput("features", [2, 64], "FP32")
    inp.set_data_from_numpy(x)
    client.infer("mlp", [inp])
    after = client.get_inference_statistics("mlp", "1").model_stats
    every = client.get_inference_statistics(as_json=True)["model_stats"]
    with pytest.raises(InferenceServerException) as unknown:
        client.get_inference_statistics("no_such_model")

    assert [(s.name, s.version) for s in before] == [("mlp", "1")]
    assert [(s.name, s.version) for s in after] == [("mlp", "1")]
    for field in ("inference_count", "execution_count", "last_inference"):
        assert getattr(after[0], field) >= getattr(before[0], field), field
    assert after[0].inference_stats.success.count >= before[0].inference_stats.success.count
    assert sorted(s["name"] for s in every) == sorted(EXAMPLE_MODELS)
    assert unknown.value.status() == "StatusCode.NOT_FOUND"
    assert "statistics" in client.get_server_metadata().extensions


async def test_statistics_with_the_asyncio_client(mesh: RunningMesh) -> None:
    client = tc_aio.InferenceServerClient(mesh.address)
    try:
        answer = await client.get_inference_statistics("mlp", as_json=True)
        with pytest.raises(InferenceServerException) as unknown:
            await client.get_inference_statistics("mlp", "9")
    finally:
        await client.close()
    (stats,) = answer["model_stats"]
    assert (stats["name"], stats["version"]) == ("mlp", "1")
    assert "inference_stats" in stats
    assert unknown.value.status() == "StatusCode.NOT_FOUND"


def _mlp_input(x: np.ndarray) -> tc.InferInput:
    inp = tc.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def test_sync_stream_many_in_flight_with_ids_and_errors(mesh: RunningMesh) -> None:
    """start_stream / async_stream_infer: many requests sent before any answer is read,
    each answered with its id; a bad one arrives as an error and the stream goes on."""
    answers: queue.Queue[tuple[object, object]] = queue.Queue()
    rng = np.random.default_rng(5)
    batches = {f"s-{i}": rng.standard_normal((1 + i % 3, 64)).astype(np.float32) for i in range(16)}
    client = tc.InferenceServerClient(mesh.address)
    client.start_stream(callback=lambda result, error: answers.put((result, error)), stream_timeout=30)
    try:
        for request_id, x in batches.items():
            client.async_stream_infer("mlp", [_mlp_input(x)], request_id=request_id, priority=1, timeout=5_000_000)
        wrong = tc.InferInput("features", [1, 64], "FP64")
        wrong.set_data_from_numpy(np.zeros((1, 64), np.float64))
        client.async_stream_infer("mlp", [wrong], request_id="bad")
        got = [answers.get(timeout=20) for _ in range(len(batches) + 1)]
    finally:
        client.stop_stream()
        client.close()
    errors = [error for result, error in got if error is not None]
    assert len(errors) == 1
    assert "input 'features': expected FP32, got FP64" in errors[0].message()
    results = {result.get_response().id: result for result, error in got if error is None}
    assert sorted(results) == sorted(batches)
    for request_id, x in batches.items():
        want = reference(mesh.repository, "mlp", {"features": x})[1]
        np.testing.assert_allclose(results[request_id].as_numpy("probabilities"), want, rtol=1e-5, atol=1e-6)


def test_sync_stream_with_triton_grpc_error_ends_with_the_status(mesh: RunningMesh) -> None:
    answers: queue.Queue[tuple[object, object]] = queue.Queue()
    client = tc.InferenceServerClient(mesh.address)
    client.start_stream(
        callback=lambda result, error: answers.put((result, error)),
        stream_timeout=30,
        headers={"triton_grpc_error": "true"},
    )
    try:
        client.async_stream_infer("no_such_model", [_mlp_input(np.ones((1, 64), np.float32))], request_id="x")
        result, error = answers.get(timeout=20)
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    assert result is None
    assert isinstance(error, InferenceServerException)
    assert error.status() == "StatusCode.NOT_FOUND"
    assert "unknown model 'no_such_model'" in error.message()


async def test_asyncio_stream_infer(mesh: RunningMesh) -> None:
    rng = np.random.default_rng(6)
    batches = [rng.standard_normal((2, 64)).astype(np.float32) for _ in range(8)]

    async def requests() -> AsyncIterator[dict[str, object]]:
        for index, x in enumerate(batches):
            yield {"model_name": "mlp", "inputs": [_mlp_input(x)], "request_id": f"a-{index}"}
        yield {"model_name": "mlp", "inputs": [_mlp_input(np.ones((1, 3), np.float32))], "request_id": "bad-shape"}

    client = tc_aio.InferenceServerClient(mesh.address)
    try:
        got = [answer async for answer in client.stream_infer(requests(), stream_timeout=30)]
    finally:
        await client.close()
    assert len(got) == len(batches) + 1
    errors = [error for result, error in got if error is not None]
    assert len(errors) == 1
    assert "input 'features'" in errors[0].message()
    results = {result.get_response().id: result for result, error in got if error is None}
    for index, x in enumerate(batches):
        want = reference(mesh.repository, "mlp", {"features": x})[1]
        np.testing.assert_allclose(results[f"a-{index}"].as_numpy("probabilities"), want, rtol=1e-5, atol=1e-6)


def test_strings_as_tritonclient_sends_them(dtype_mesh: RunningMesh) -> None:
    """Issue 16: "HeLLo" came back as b"b'hello'"; now what ONNX Runtime gives in-process."""
    client = tc.InferenceServerClient(dtype_mesh.address)
    words = ["HeLLo", "WORLD Été", "", "NUL\x00INSIDE", "ΑΒΓ Straße"]
    text = np.array([w.encode() for w in words], dtype=np.object_)
    inp = tc.InferInput("text", [len(words)], "BYTES")
    inp.set_data_from_numpy(text)
    got = client.infer(LOWERCASE, [inp]).as_numpy("lower")
    (want,) = reference(dtype_mesh.repository, LOWERCASE, {"text": np.array(words, dtype=np.object_)})
    assert got.tolist() == [str(s).encode() for s in want]
    assert got.tolist()[:2] == [b"hello", "world été".encode()]
    binary = tc.InferInput("text", [1], "BYTES")
    binary.set_data_from_numpy(np.array([b"\xff\xfe"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as refused:
        client.infer(LOWERCASE, [binary])
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input 'text': BYTES element 0 is not valid UTF-8" in refused.value.message()


def test_every_datatype_as_tritonclient_sends_it(dtype_mesh: RunningMesh) -> None:
    client = tc.InferenceServerClient(dtype_mesh.address)
    rng = np.random.default_rng(3)
    for datatype in IDENTITY_DATATYPES:
        if datatype == "BYTES":
            x = np.array([[b"a", b"", "é".encode()]] * 2, dtype=np.object_)
            feed = np.array([["a", "", "é"]] * 2, dtype=np.object_)
        else:
            x = feed = (rng.integers(0, 100, (2, 3)) % (2 if datatype == "BOOL" else 100)).astype(
                tc.triton_to_np_dtype(datatype)
            )
        inp = tc.InferInput("x", [2, 3], datatype)
        inp.set_data_from_numpy(x)
        got = client.infer(identity_name(datatype), [inp]).as_numpy("y")
        (want,) = reference(dtype_mesh.repository, identity_name(datatype), {"x": feed})
        if datatype == "BYTES":
            want = np.vectorize(str.encode, otypes=[np.object_])(want)
        assert got.dtype == x.dtype, datatype
        np.testing.assert_array_equal(got, want, err_msg=datatype)


def test_health_service_and_reflection(mesh: RunningMesh) -> None:
    with grpc.insecure_channel(mesh.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


def _children(pid: int) -> dict[int, str]:
    """Child processes of ``pid``: pid -> command line (from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found[int(entry.name)] = cmdline
    return found


def test_a_killed_worker_is_restarted_and_queued_work_is_served(mesh: RunningMesh) -> None:
    """kill -9 the worker: `up` restarts it, and a request sent meanwhile is answered.

    Runs last in this module: it disturbs the shared mesh.
    """
    workers = [pid for pid, cmd in _children(mesh.proc.pid).items() if "meshserve worker" in cmd]
    assert len(workers) == 1, _children(mesh.proc.pid)
    children = _children(mesh.proc.pid).values()
    roles = {cmd.split("-m meshserve ", 1)[1].split()[0] for cmd in children if "-m meshserve " in cmd}
    assert roles == {"router", "gateway", "worker"}  # each service's command line names its role
    if os.environ.get("MESHSERVE_TEST_REDIS_CLUSTER") != "1":  # a cluster is external: no private Redis
        assert any("valkey-server" in cmd for cmd in children)  # and the private Redis
    os.kill(workers[0], signal.SIGKILL)

    client = tc.InferenceServerClient(mesh.address)
    x = np.ones((1, 64), dtype=np.float32)
    inp = tc.InferInput("features", [1, 64], "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("mlp", [inp], client_timeout=REQUEUED_CALL_TIMEOUT_S)  # queued until the new worker takes it
    np.testing.assert_allclose(
        result.as_numpy("logits"), reference(mesh.repository, "mlp", {"features": x})[0], rtol=1e-5, atol=1e-6
    )
    new_workers = [pid for pid, cmd in _children(mesh.proc.pid).items() if "meshserve worker" in cmd]
    assert len(new_workers) == 1
    assert new_workers != workers
