"""The fuzzed mesh and the checks on one call.

Hypothesis and async fixtures mix poorly, so the mesh runs on its own event loop
in a background thread and the tests call it with a synchronous channel.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from redis.asyncio import Redis

from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from tests.dtype_models import build_lowercase
from tests.fuzz.oracle import (
    CONTENTS_FIELD,
    MAX_MESSAGE_BYTES,
    MODELS,
    NUMPY_DTYPE,
    RPC_TIMEOUT_S,
    Request,
    asks_tiny_timeout,
    class_counts,
    expected_code,
    strings_of,
)
from tests.support import Mesh, start_mesh, stop_mesh

T = TypeVar("T")

MAX_DETAILS_CHARS = 1024
"""Status details quote client-chosen names; past 8 KiB of trailer, clients drop the call."""

CRASH_CODES = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})


START_TIMEOUT_S = 20.0  # well under a second alone: it counts against the first test's 60 s
STOP_TIMEOUT_S = 15.0  # and this against the last test's
JOIN_TIMEOUT_S = 5.0


class MeshThread:
    """A mesh on its own event loop in a daemon thread; ``call`` runs a coroutine there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-mesh", daemon=True)

    def call(self, coroutine: Coroutine[Any, Any, T], timeout_s: float) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def start(self, redis_url: str, repository: Path) -> Mesh:
        self.thread.start()
        return self.call(_start(redis_url, repository), timeout_s=START_TIMEOUT_S)

    def stop(self, mesh: Mesh) -> None:
        try:
            self.call(_stop(mesh), timeout_s=STOP_TIMEOUT_S)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=JOIN_TIMEOUT_S)
            self.loop.close()


async def _start(redis_url: str, repository: Path) -> Mesh:
    redis = Redis.from_url(redis_url)
    try:
        await redis.flushdb()
    finally:
        await redis.aclose()
    return await start_mesh(redis_url, repository, max_message_bytes=MAX_MESSAGE_BYTES)


async def _stop(mesh: Mesh) -> None:
    await stop_mesh(mesh)
    current = asyncio.current_task()
    leftovers = [task for task in asyncio.all_tasks() if task is not current]
    for task in leftovers:
        task.cancel()
    await asyncio.gather(*leftovers, return_exceptions=True)


@dataclass
class LiveMesh:
    mesh: Mesh
    stub: pb_grpc.GRPCInferenceServiceStub


def check_model_table(mesh: Mesh) -> None:
    """The oracle's table is what the mesh serves (else the fuzz checks the wrong thing)."""
    view = mesh.gateway.routing.view
    for name, model in MODELS.items():
        info = view.models[(name, 1)]
        assert {t.name: (t.datatype, tuple(t.shape)) for t in info.inputs} == model.inputs
        assert tuple(t.name for t in info.outputs) == model.outputs
        assert info.max_batch_size == model.max_batch_size
    assert set(view.latest) == set(MODELS)


def call(
    stub: pb_grpc.GRPCInferenceServiceStub, request: Request, deadline_s: float
) -> tuple[grpc.StatusCode, str, Any]:
    """(code, details, response or None) of one ModelInfer call."""
    try:
        response = stub.ModelInfer(request, timeout=deadline_s)
    except grpc.RpcError as error:
        return error.code(), error.details() or "", None
    return grpc.StatusCode.OK, "", response


def input_array(request: Request, name: str) -> np.ndarray[Any, Any]:
    index = next(i for i, t in enumerate(request.inputs) if t.name == name)
    tensor = request.inputs[index]
    dtype = NUMPY_DTYPE[tensor.datatype]
    if request.raw_input_contents:
        flat = np.frombuffer(request.raw_input_contents[index], dtype=dtype)
    else:
        flat = np.asarray(getattr(tensor.contents, CONTENTS_FIELD[tensor.datatype]), dtype=dtype)
    return flat.reshape(tuple(tensor.shape))


@cache
def lowercase_session() -> ort.InferenceSession:
    """In-process ONNX Runtime on the same ``lowercase`` model the mesh serves."""
    return ort.InferenceSession(build_lowercase(), providers=["CPUExecutionProvider"])


def check_strings(request: Request, response: pb.ModelInferResponse) -> None:
    """The ``lowercase`` model's answer equals in-process ONNX Runtime's, byte for byte."""
    tensor = request.inputs[0]
    if request.raw_input_contents:
        items = strings_of(request.raw_input_contents[0]) or []
    else:
        items = list(tensor.contents.bytes_contents)
    feed = np.array([item.decode() for item in items], dtype=np.object_)
    (expected,) = lowercase_session().run(None, {"text": feed})
    (out,) = response.outputs
    assert (out.datatype, list(out.shape)) == ("BYTES", list(tensor.shape))
    assert strings_of(response.raw_output_contents[0]) == [str(s).encode() for s in expected]


def check_response(request: Request, response: pb.ModelInferResponse) -> None:
    """Outputs named as asked, shaped like the inputs, and right for the two arithmetic
    models and the string model."""
    model = MODELS[request.model_name]
    assert response.model_name == request.model_name
    assert response.model_version == "1"
    assert response.id == request.id
    wanted = {out.name for out in request.outputs} or set(model.outputs)
    assert {out.name for out in response.outputs} == wanted
    ranked = class_counts(request)  # Triton's classification: "value:index" strings, checked for shape here
    for out in response.outputs:
        if out.name in ranked:
            assert out.datatype == "BYTES"
            assert list(out.shape)[-1] <= ranked[out.name]
    assert len(response.raw_output_contents) == len(response.outputs)
    if request.model_name == "lowercase":
        check_strings(request, response)
        return
    outputs = {
        out.name: np.frombuffer(raw, dtype=NUMPY_DTYPE[out.datatype]).reshape(tuple(out.shape))
        for out, raw in zip(response.outputs, response.raw_output_contents, strict=True)
        if out.name not in ranked
    }
    if request.model_name == "scale_any" and "scaled" in outputs:
        image = input_array(request, "image")
        with np.errstate(over="ignore", invalid="ignore"):  # edge values: inf * 2, nan
            np.testing.assert_array_equal(outputs["scaled"], image * np.float32(2) + np.float32(1))
    elif request.model_name == "adder_fixed":
        a, b = input_array(request, "a"), input_array(request, "b")
        with np.errstate(over="ignore"):  # int64 arithmetic wraps, in ONNX Runtime as in numpy
            expected = {"sum": a + b, "diff": a - b}
        for name, array in outputs.items():
            np.testing.assert_array_equal(array, expected[name])
    else:
        batch = request.inputs[0].shape[0]
        classes = 100 if request.model_name == "mobilenet" else 10
        for array in outputs.values():
            assert array.shape == (batch, classes)


def check_call(stub: pb_grpc.GRPCInferenceServiceStub, request: Request, deadline_s: float = RPC_TIMEOUT_S) -> str:
    """Send ``request``; check its status against the oracle. Returns "expected X, got Y"."""
    expected = expected_code(request)
    code, details, response = call(stub, request, deadline_s)
    outcome = f"expected {expected.name}, got {code.name}"
    assert code not in CRASH_CODES, f"the gateway crashed: {code.name}: {details}"
    assert len(details) <= MAX_DETAILS_CHARS, f"{len(details)} chars of status details"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and (
        deadline_s < RPC_TIMEOUT_S or (expected == grpc.StatusCode.OK and asks_tiny_timeout(request))
    ):
        return outcome
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and not details.startswith("deadline exceeded"):
        pytest.fail(f"no answer within {RPC_TIMEOUT_S} s (a hang); expected {expected.name}")
    assert code == expected, f"expected {expected.name}, got {code.name}: {details}"
    if code == grpc.StatusCode.OK:
        check_response(request, response)
    return outcome


def check_still_serving(live: LiveMesh) -> None:
    assert live.stub.ServerLive(pb.ServerLiveRequest(), timeout=RPC_TIMEOUT_S).live
    assert live.stub.ServerReady(pb.ServerReadyRequest(), timeout=RPC_TIMEOUT_S).ready
    request = Request(model_name="adder_fixed")
    for name in ("a", "b"):
        request.inputs.add(name=name, datatype="INT64", shape=[1, 4])
        request.raw_input_contents.append(np.arange(4, dtype="<i8").tobytes())
    assert check_call(live.stub, request) == "expected OK, got OK"
    assert live.mesh.gateway.gateway.pending == {}  # every waiter removed its own entry
