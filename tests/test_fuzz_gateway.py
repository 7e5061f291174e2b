"""Bad-input fuzzing of a live gateway (issue #4).

Hypothesis builds ModelInferRequests for the example models, mostly malformed
(unknown models and versions, wrong datatypes, shapes, byte lengths, huge and
negative dims, BYTES tensors with broken length prefixes, odd parameters,
oversized messages) and some valid, and sends each over real gRPC to one mesh
that serves the whole module. An oracle written from the models' declared
inputs, independent of the codec, says which status each request must get:
OK only for a valid request, else RESOURCE_EXHAUSTED, NOT_FOUND or
INVALID_ARGUMENT; DEADLINE_EXCEEDED only when the request asked for a tiny
timeout or the client gave it a tiny deadline. UNKNOWN or INTERNAL is a crash in
our code; no answer within the call's deadline is a hang. Status details stay
short (they quote client-chosen names). Bugs found this way stay as explicit
``@example`` regressions.

Hypothesis and async fixtures mix poorly, so the mesh runs on its own event loop
in a background thread and the tests call it with a synchronous channel.

A second property drives the codec alone over every KServe datatype (no example
model has BYTES or narrow integer inputs), and a last test sends 10 000
deterministic malformed requests and checks that the gateway's memory stays flat.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import struct
import threading
import tracemalloc
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.strategies import DrawFn
from redis.asyncio import Redis

from meshserve.errors import InvalidArgument
from meshserve.models.repository import ModelInfo, TensorInfo
from meshserve.wire.codec import pack_inputs
from meshserve.wire.dtypes import NUMPY_BY_KSERVE
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from tests.support import Mesh, start_mesh, stop_mesh

T = TypeVar("T")
Request = pb.ModelInferRequest
InferTensor = pb.ModelInferRequest.InferInputTensor
Mutation = Callable[[DrawFn, Request], None]

MAX_MESSAGE_BYTES = 1 << 20
"""The fuzzed gateway's receive limit: small, so that oversized messages are cheap."""

RPC_TIMEOUT_S = 5.0
"""Client deadline of every call; a call that reaches it (without a tiny timeout) hung."""

TINY_TIMEOUT_US = 2_000_000
"""A ``timeout`` parameter below this may legitimately end in DEADLINE_EXCEEDED."""

FUZZ_EXAMPLES = 300
MEMORY_REQUESTS = 10_000
MEMORY_WARM_UP = 2_000
MEMORY_GROWTH_LIMIT_BYTES = 2 * 1024 * 1024  # Python heap, traced
RSS_GROWTH_LIMIT_BYTES = 8 * 1024 * 1024  # whole process, grpc's C core included

MAX_DETAILS_CHARS = 1024
"""Status details quote client-chosen names; past 8 KiB of trailer, clients drop the call."""

CRASH_CODES = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})

# ------------------------------------------------------------ the oracle's model table


@dataclass(frozen=True, slots=True)
class Model:
    """What an example model declares (written out here, not read from the mesh)."""

    inputs: dict[str, tuple[str, tuple[int, ...]]]  # name -> (datatype, shape; -1 is free)
    outputs: tuple[str, ...]
    max_batch_size: int  # 0: dim 0 is not a batch dim


MODELS: dict[str, Model] = {
    "mlp": Model({"features": ("FP32", (-1, 64))}, ("logits", "probabilities"), 32),
    "cnn": Model({"image": ("FP32", (-1, 3, 32, 32))}, ("logits",), 8),
    "adder_fixed": Model({"a": ("INT64", (1, 4)), "b": ("INT64", (1, 4))}, ("sum", "diff"), 0),
    "scale_any": Model({"image": ("FP32", (-1, 1, -1, -1))}, ("scaled",), 32),
}

KSERVE_DATATYPES = (
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BF16",
    "BYTES",
)
ITEMSIZE = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2}
ITEMSIZE |= {"UINT32": 4, "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8}
NUMPY_DTYPE = {"FP32": np.dtype("<f4"), "INT64": np.dtype("<i8")}  # what the example models take

# Typed field per datatype, as the KServe v2 protocol defines it (FP16, BF16: raw only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
CONTENTS_FIELDS = tuple(sorted(set(CONTENTS_FIELD.values())))


def contents_counts(tensor: InferTensor) -> dict[str, int]:
    return {field: len(getattr(tensor.contents, field)) for field in CONTENTS_FIELDS}


def timeout_us_of(request: Request) -> int:
    """The ``timeout`` parameter as the gateway reads it (int64 or uint64 microseconds)."""
    if "timeout" not in request.parameters:
        return 0
    param = request.parameters["timeout"]
    return int(param.int64_param or param.uint64_param)


def asks_tiny_timeout(request: Request) -> bool:
    return 0 < timeout_us_of(request) < TINY_TIMEOUT_US


def version_is_one(version: str) -> bool:
    """The only version of every example model is 1; "" means the latest.

    Accepts what Python's ``int`` (like Triton's ``stoll``) accepts: " 1", "+1", "01".
    """
    if not version:
        return True
    try:
        return int(version) == 1
    except ValueError:
        return False


def inputs_are_valid(request: Request, model: Model) -> bool:
    """The KServe v2 rules for the inputs of one of the example models."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        return False
    if sorted(t.name for t in request.inputs) != sorted(model.inputs):
        return False  # unknown, duplicate or missing inputs
    for index, tensor in enumerate(request.inputs):
        datatype, spec = model.inputs[tensor.name]
        shape = list(tensor.shape)
        if tensor.datatype != datatype or len(shape) != len(spec):
            return False
        if any(got < 0 or (want >= 0 and got != want) for got, want in zip(shape, spec, strict=True)):
            return False
        if model.max_batch_size and not 1 <= shape[0] <= model.max_batch_size:
            return False
        count, counts = prod(shape), contents_counts(tensor)
        if raw:
            if any(counts.values()) or len(raw[index]) != count * ITEMSIZE[datatype]:
                return False
        else:
            field = CONTENTS_FIELD[datatype]
            if counts[field] != count or any(n for f, n in counts.items() if f != field):
                return False
    return True


def expected_code(request: Request) -> grpc.StatusCode:
    """The status a correct gateway answers, in the order it must check."""
    if request.ByteSize() > MAX_MESSAGE_BYTES:
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    model = MODELS.get(request.model_name)
    if model is None or not version_is_one(request.model_version):
        return grpc.StatusCode.NOT_FOUND
    if not inputs_are_valid(request, model) or any(out.name not in model.outputs for out in request.outputs):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.OK


# ------------------------------------------------------------ the mesh in a thread


class MeshThread:
    """A mesh on its own event loop in a daemon thread; ``call`` runs a coroutine there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-mesh", daemon=True)

    def call(self, coroutine: Coroutine[Any, Any, T], timeout_s: float) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def start(self, redis_url: str, repository: Path) -> Mesh:
        self.thread.start()
        return self.call(_start(redis_url, repository), timeout_s=60)

    def stop(self, mesh: Mesh) -> None:
        try:
            self.call(_stop(mesh), timeout_s=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
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


@pytest.fixture(scope="module")
def live(redis_url: str, model_repository: Path) -> Iterator[LiveMesh]:
    runner = MeshThread()
    mesh = runner.start(redis_url, model_repository)
    try:
        check_model_table(mesh)
        with grpc.insecure_channel(mesh.address) as channel:
            yield LiveMesh(mesh, pb_grpc.GRPCInferenceServiceStub(channel))
    finally:
        runner.stop(mesh)


def check_model_table(mesh: Mesh) -> None:
    """The oracle's table is what the mesh serves (else the fuzz checks the wrong thing)."""
    view = mesh.gateway.routing.view
    for name, model in MODELS.items():
        info = view.models[(name, 1)]
        assert {t.name: (t.datatype, tuple(t.shape)) for t in info.inputs} == model.inputs
        assert tuple(t.name for t in info.outputs) == model.outputs
        assert info.max_batch_size == model.max_batch_size
    assert set(view.latest) == set(MODELS)


# ------------------------------------------------------------ strategies

OTHER_INPUT_NAMES = ("features", "image", "a", "b", "", "A", "image ", "x", "a\x00", "\u00e9")
OUTPUT_NAMES = ("logits", "probabilities", "sum", "diff", "scaled", "", "embedding", "LOGITS", "logits\n")
BAD_MODEL_NAMES = ("", "nope", "MLP", "mlp ", " mlp", "mlp\x00", "mlp/1", "../mlp", "*", "cnn\u200b", "m" * 10_000)
BAD_VERSIONS = ("0", "2", "-1", "1.0", "1e0", "one", "latest", "0x1", "1 2", str(2**63), str(2**64), "9" * 5000)
ODD_VERSIONS = (" 1", "+1", "01", "1\n", "\u0661")  # int() takes these as 1
GARBAGE_DATATYPES = ("", "fp32", "FLOAT", "FP32 ", " FP32", "TYPE_FP32", "INT", "STRING", "FP8", "FP32\x00", "INT64;")
SPECIAL_DIMS = (-(2**63), -(2**31), -2, -1, 0, 1, 2, 3, 4, 31, 32, 33, 64, 2**31, 2**32, 2**40, 2**62, 2**63 - 1)
PARAMETER_KEYS = ("priority", "timeout", "sequence_id", "binary_data_output", "", "Priority", "timeout ")

dims = st.one_of(st.sampled_from(SPECIAL_DIMS), st.integers(-(2**63), 2**63 - 1))
short_text = st.text(max_size=24)
int64s = st.integers(-(2**63), 2**63 - 1)
uint64s = st.integers(0, 2**64 - 1)

BROKEN_BYTES = (
    b"\x01",  # truncated inside a length prefix
    b"\x05\x00\x00\x00ab",  # element runs past the end
    b"\xff\xff\xff\xff",  # a 4 GiB element in four bytes
    b"\x00\x00\x00\x00" * 64,  # 64 empty elements
    b"\x02\x00\x00\x00ab\x01\x00",  # good element, then a broken prefix
    b"",
)


def _encode_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


bytes_blobs = st.one_of(
    st.sampled_from(BROKEN_BYTES),
    st.lists(st.binary(max_size=8), max_size=8).map(_encode_bytes),
    st.binary(max_size=64),
)


@st.composite
def parameters(draw: DrawFn) -> pb.InferParameter:
    """One InferParameter of any kind, with edge values."""
    kind = draw(st.sampled_from(["bool", "int64", "uint64", "string", "double", "unset"]))
    if kind == "bool":
        return pb.InferParameter(bool_param=draw(st.booleans()))
    if kind == "int64":
        return pb.InferParameter(int64_param=draw(st.one_of(st.sampled_from([-1, 0, 1, 2, 1000, -(2**63)]), int64s)))
    if kind == "uint64":
        return pb.InferParameter(uint64_param=draw(st.one_of(st.sampled_from([0, 1, 3, 2**64 - 1]), uint64s)))
    if kind == "string":
        return pb.InferParameter(string_param=draw(st.one_of(st.sampled_from(["high", "-1", "1"]), short_text)))
    if kind == "double":
        return pb.InferParameter(double_param=draw(st.floats(allow_nan=True, allow_infinity=True)))
    return pb.InferParameter()


def _values(draw: DrawFn, datatype: str, shape: list[int]) -> np.ndarray[Any, Any]:
    """Tensor values: random small ints (exact in FP32 too) or one edge value."""
    dtype = NUMPY_DTYPE[datatype]
    if draw(st.booleans()):
        seed = draw(st.integers(0, 2**32 - 1))
        return np.random.default_rng(seed).integers(-100, 100, shape).astype(dtype)
    if datatype == "INT64":
        return np.full(shape, draw(st.sampled_from([-(2**63), -1, 0, 2**40, 2**63 - 1])), dtype)
    return np.full(shape, draw(st.sampled_from([0.0, -0.0, 1e-45, 3.4e38, np.inf, -np.inf, np.nan])), dtype)


@st.composite
def valid_requests(draw: DrawFn) -> Request:
    """A request one of the example models accepts: raw or typed, any input order."""
    name = draw(st.sampled_from(sorted(MODELS)))
    model = MODELS[name]
    batch = draw(st.integers(1, 4))
    height, width = draw(st.integers(0, 12)), draw(st.integers(0, 12))
    request = Request(model_name=name, model_version=draw(st.sampled_from(["", "1"])), id=draw(short_text))
    typed = draw(st.booleans())
    for input_name in draw(st.permutations(sorted(model.inputs))):
        datatype, spec = model.inputs[input_name]
        shape = list(spec)
        if model.max_batch_size:
            shape[0] = batch
        if name == "scale_any":
            shape[2:] = [height, width]
        values = _values(draw, datatype, shape)
        tensor = request.inputs.add(name=input_name, datatype=datatype, shape=shape)
        if typed:
            getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(values.ravel().tolist())
        else:
            request.raw_input_contents.append(values.tobytes())
    for output in draw(st.lists(st.sampled_from(model.outputs), max_size=2)):
        request.outputs.add(name=output)
    if draw(st.booleans()):
        request.parameters["priority"].uint64_param = draw(st.integers(0, 4))
    if draw(st.booleans()):
        request.parameters["timeout"].int64_param = draw(st.integers(TINY_TIMEOUT_US, 60_000_000))
    return request


def _pick(draw: DrawFn, request: Request) -> int | None:
    """Index of an input to spoil; None when the request has none."""
    if not request.inputs:
        return None
    return draw(st.integers(0, len(request.inputs) - 1))


def mutate_model_name(draw: DrawFn, request: Request) -> None:
    request.model_name = draw(st.one_of(st.sampled_from(BAD_MODEL_NAMES + tuple(MODELS)), short_text))


def mutate_version(draw: DrawFn, request: Request) -> None:
    request.model_version = draw(
        st.one_of(st.sampled_from(BAD_VERSIONS + ODD_VERSIONS), short_text, st.integers(-(2**70), 2**70).map(str))
    )


def mutate_input_name(draw: DrawFn, request: Request) -> None:
    if (index := _pick(draw, request)) is not None:
        request.inputs[index].name = draw(st.one_of(st.sampled_from(OTHER_INPUT_NAMES), short_text))


def duplicate_input(draw: DrawFn, request: Request) -> None:
    if (index := _pick(draw, request)) is not None:
        request.inputs.add().CopyFrom(request.inputs[index])
        if index < len(request.raw_input_contents) and draw(st.booleans()):
            request.raw_input_contents.append(request.raw_input_contents[index])


def drop_input(draw: DrawFn, request: Request) -> None:
    if (index := _pick(draw, request)) is not None:
        del request.inputs[index]
        if index < len(request.raw_input_contents) and draw(st.booleans()):
            del request.raw_input_contents[index]


def drop_all_inputs(draw: DrawFn, request: Request) -> None:
    del request.inputs[:]
    if draw(st.booleans()):
        del request.raw_input_contents[:]


def mutate_datatype(draw: DrawFn, request: Request) -> None:
    if (index := _pick(draw, request)) is not None:
        request.inputs[index].datatype = draw(
            st.one_of(st.sampled_from(KSERVE_DATATYPES + GARBAGE_DATATYPES), short_text)
        )


def mutate_shape(draw: DrawFn, request: Request) -> None:
    if (index := _pick(draw, request)) is not None:
        request.inputs[index].shape[:] = draw(st.lists(dims, max_size=6))


def mutate_dim(draw: DrawFn, request: Request) -> None:
    index = _pick(draw, request)
    if index is not None and request.inputs[index].shape:
        shape = request.inputs[index].shape
        shape[draw(st.integers(0, len(shape) - 1))] = draw(dims)


def mutate_raw_length(draw: DrawFn, request: Request) -> None:
    if not request.raw_input_contents:
        return
    index = draw(st.integers(0, len(request.raw_input_contents) - 1))
    blob = request.raw_input_contents[index]
    cut = draw(st.integers(1, 9))
    request.raw_input_contents[index] = draw(st.sampled_from([blob[:-cut], blob + b"\x00" * cut, b"", blob[:1]]))


def mutate_raw_count(draw: DrawFn, request: Request) -> None:
    raw = request.raw_input_contents
    action = draw(st.sampled_from(["append", "drop", "clear", "add-to-typed"]))
    if action == "append" and raw:
        raw.append(raw[0])
    elif action == "drop" and raw:
        del raw[-1]
    elif action == "clear":
        del raw[:]
    elif action == "add-to-typed" and not raw:
        raw.append(b"\x00" * draw(st.sampled_from([0, 4, 8, 256])))


_FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "bool_contents": st.booleans(),
    "int_contents": st.integers(-(2**31), 2**31 - 1),
    "int64_contents": int64s,
    "uint_contents": st.integers(0, 2**32 - 1),
    "uint64_contents": uint64s,
    "fp32_contents": st.floats(width=32),
    "fp64_contents": st.floats(),
    "bytes_contents": st.binary(max_size=8),
}


def typed_contents(draw: DrawFn, request: Request) -> None:
    """Typed contents of any kind, with the right count or one off; raw kept or not."""
    if (index := _pick(draw, request)) is None:
        return
    tensor = request.inputs[index]
    expected = prod(tensor.shape) if tensor.shape and all(0 <= d <= 20_000 for d in tensor.shape) else 4
    count = min(draw(st.sampled_from([expected, expected - 1, expected + 1, 0, 1])), 20_000)
    field = draw(st.sampled_from(CONTENTS_FIELDS))
    getattr(tensor.contents, field).extend([draw(_FIELD_VALUES[field])] * max(count, 0))
    if draw(st.booleans()):
        del request.raw_input_contents[:]


def bytes_tensor(draw: DrawFn, request: Request) -> None:
    """Turn an input into BYTES, with broken or well-formed length prefixes."""
    if (index := _pick(draw, request)) is None:
        return
    tensor = request.inputs[index]
    tensor.datatype = "BYTES"
    if index < len(request.raw_input_contents):
        request.raw_input_contents[index] = draw(bytes_blobs)
    else:
        tensor.contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=8), max_size=8)))


def oversized(draw: DrawFn, request: Request) -> None:
    """A message just past the gateway's receive limit."""
    blob = b"\x00" * (MAX_MESSAGE_BYTES + draw(st.integers(1, 4096)))
    if request.raw_input_contents:
        request.raw_input_contents[0] = blob
    else:
        request.raw_input_contents.append(blob)


def odd_parameters(draw: DrawFn, request: Request) -> None:
    """Request, input and output parameters of any kind, priority and timeout included."""
    target = draw(st.sampled_from(["request", "input", "output"]))
    key = draw(st.one_of(st.sampled_from(PARAMETER_KEYS), short_text))
    value = draw(parameters())
    if target == "input" and request.inputs:
        request.inputs[0].parameters[key].CopyFrom(value)
    elif target == "output" and request.outputs:
        request.outputs[0].parameters[key].CopyFrom(value)
    else:
        request.parameters[key].CopyFrom(value)


def tiny_timeout(draw: DrawFn, request: Request) -> None:
    """A ``timeout`` parameter (microseconds) that may pass before the reply comes."""
    value = draw(st.sampled_from([1, 10, 1_000, 20_000, 200_000]))
    if draw(st.booleans()):
        request.parameters["timeout"].int64_param = value
    else:
        request.parameters["timeout"].uint64_param = value


def requested_outputs(draw: DrawFn, request: Request) -> None:
    for name in draw(st.lists(st.one_of(st.sampled_from(OUTPUT_NAMES), short_text), min_size=1, max_size=3)):
        request.outputs.add(name=name)


def mutate_id(draw: DrawFn, request: Request) -> None:
    request.id = draw(st.one_of(st.text(max_size=200), st.just("i" * 100_000)))


MUTATIONS: tuple[Mutation, ...] = (
    mutate_model_name,
    mutate_version,
    mutate_input_name,
    duplicate_input,
    drop_input,
    drop_all_inputs,
    mutate_datatype,
    mutate_shape,
    mutate_dim,
    mutate_raw_length,
    mutate_raw_count,
    typed_contents,
    bytes_tensor,
    oversized,
    odd_parameters,
    tiny_timeout,
    requested_outputs,
    mutate_id,
)


class Case:
    """A request and the client's deadline for it; the repr stays short (a summary,
    not 100 kB of tensor values). Not a dataclass: hypothesis prints those field by field."""

    __slots__ = ("deadline_s", "request")

    def __init__(self, request: Request, deadline_s: float = RPC_TIMEOUT_S) -> None:
        self.request = request
        self.deadline_s = deadline_s

    def __repr__(self) -> str:
        return f"{describe(self.request)}, deadline_s={self.deadline_s}"


def describe(request: Request) -> str:
    def params(parameters: Any) -> str:
        return "{" + ", ".join(f"{k!r}: {str(v).strip() or 'unset'}" for k, v in parameters.items()) + "}"

    def contents(tensor: InferTensor) -> str:
        return ", ".join(f"{field}[{n}]" for field, n in contents_counts(tensor).items() if n)

    inputs = [f"{t.name!r} {t.datatype!r} {list(t.shape)} {contents(t)} {params(t.parameters)}" for t in request.inputs]
    outputs = [f"{o.name!r} {params(o.parameters)}" for o in request.outputs]
    return (
        f"ModelInferRequest(model_name={request.model_name[:80]!r}, model_version={request.model_version[:80]!r}, "
        f"id={request.id[:40]!r} ({len(request.id)} chars), parameters={params(request.parameters)}, "
        f"inputs={inputs}, raw_input_contents=<{[len(raw) for raw in request.raw_input_contents]} bytes>, "
        f"outputs={outputs}, {request.ByteSize()} bytes)"
    )


@st.composite
def infer_requests(draw: DrawFn) -> Case:
    """A valid request spoiled by one to three mutations (by none, one time in six),
    sent now and then with a client deadline too short to be met."""
    request = draw(valid_requests())
    spoilt = draw(st.integers(0, 5)) < 5
    for _ in range(draw(st.integers(1, 3)) if spoilt else 0):
        draw(st.sampled_from(MUTATIONS))(draw, request)
    return Case(request, draw(st.sampled_from([RPC_TIMEOUT_S] * 9 + [0.001, 0.01, 0.1])))


# ------------------------------------------------------------ checking one call


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


def check_response(request: Request, response: pb.ModelInferResponse) -> None:
    """Outputs named as asked, shaped like the inputs, and right for the two arithmetic models."""
    model = MODELS[request.model_name]
    assert response.model_name == request.model_name
    assert response.model_version == "1"
    assert response.id == request.id
    wanted = {out.name for out in request.outputs} or set(model.outputs)
    assert {out.name for out in response.outputs} == wanted
    assert len(response.raw_output_contents) == len(response.outputs)
    outputs = {
        out.name: np.frombuffer(raw, dtype=NUMPY_DTYPE[out.datatype]).reshape(tuple(out.shape))
        for out, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }
    if request.model_name == "scale_any":
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
        for array in outputs.values():
            assert array.shape == (batch, 10)


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


# ------------------------------------------------------------ the properties


def adder_with_stray_bool_contents() -> Case:
    """Regression: values in a field other than the datatype's were ignored (answered OK)."""
    request = Request(model_name="adder_fixed")
    for name in ("a", "b"):
        request.inputs.add(name=name, datatype="INT64", shape=[1, 4]).contents.int64_contents.extend([-(2**63)] * 4)
    request.inputs[0].contents.bool_contents.extend([False] * 4)
    return Case(request)


def very_long_model_name() -> Case:
    """Regression: the NOT_FOUND details quoted all 20 000 characters, and clients
    (grpc's 8 KiB soft, 16 KiB hard metadata limit) saw RESOURCE_EXHAUSTED instead."""
    request = Request(model_name="m" * 20_000)
    request.inputs.add(name="features", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(b"\x00" * 256)
    return Case(request)


def oversized_request() -> Case:
    request = Request(model_name="mlp")
    request.inputs.add(name="features", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(b"\x00" * (MAX_MESSAGE_BYTES + 1))
    return Case(request)


def test_fuzzed_requests_get_the_right_status_never_a_crash_or_a_hang(live: LiveMesh) -> None:
    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )
    @given(case=infer_requests())
    @example(case=adder_with_stray_bool_contents())
    @example(case=very_long_model_name())
    @example(case=oversized_request())
    def one_call(case: Case) -> None:
        outcome = check_call(live.stub, case.request, case.deadline_s)
        event(outcome)
        outcomes[outcome] += 1

    outcomes: Counter[str] = Counter()
    one_call()
    print("outcomes:", dict(outcomes.most_common()))
    expected = Counter[str]()
    for outcome, n in outcomes.items():
        expected[outcome.split(",")[0].removeprefix("expected ")] += n
    assert min(expected["OK"], expected["NOT_FOUND"], expected["INVALID_ARGUMENT"]) >= 20, expected  # a real mix
    assert expected["RESOURCE_EXHAUSTED"] >= 1, expected
    check_still_serving(live)


def synthetic_model(datatype: str, max_batch_size: int, shape: tuple[int, ...]) -> ModelInfo:
    return ModelInfo(
        name="synthetic",
        version=1,
        path=Path("unused.onnx"),
        inputs=(TensorInfo("x", datatype, shape),),
        outputs=(TensorInfo("y", datatype, shape),),
        max_batch_size=max_batch_size,
        max_queue_delay_us=0,
        preferred_batch_sizes=(),
        max_queue_size=0,
    )


@st.composite
def codec_cases(draw: DrawFn) -> tuple[ModelInfo, Request]:
    """A one-input model of any KServe datatype, and a request for it (mostly well-shaped)."""
    datatype = draw(st.sampled_from(KSERVE_DATATYPES))
    spec = draw(st.sampled_from([(-1, 3), (2, 2), (-1, -1)]))
    batching = spec[0] == -1 and draw(st.booleans())
    model = synthetic_model(datatype, 4 if batching else 0, spec)
    shape = draw(st.one_of(st.just([d if d >= 0 else 2 for d in spec]), st.lists(dims, max_size=3)))
    sent = draw(st.one_of(st.just(datatype), st.sampled_from(KSERVE_DATATYPES)))
    request = Request(model_name="synthetic")
    tensor = request.inputs.add(name="x", datatype=sent, shape=shape)
    count = prod(shape) if all(0 <= d <= 8 for d in shape) else 4
    if draw(st.booleans()):
        if datatype == "BYTES":
            request.raw_input_contents.append(draw(bytes_blobs))
        else:
            size = ITEMSIZE[datatype] * count + draw(st.sampled_from([0, 0, -1, 1]))
            request.raw_input_contents.append(draw(st.binary(min_size=max(size, 0), max_size=max(size, 0))))
    else:
        field = draw(
            st.one_of(st.just(CONTENTS_FIELD.get(datatype, "fp32_contents")), st.sampled_from(CONTENTS_FIELDS))
        )
        size = max(count + draw(st.sampled_from([0, 0, -1, 1])), 0)
        getattr(tensor.contents, field).extend(draw(st.lists(_FIELD_VALUES[field], min_size=size, max_size=size)))
    return model, request


def check_packed(model: ModelInfo, request: Request) -> None:
    """``pack_inputs`` accepts (consistently) or raises InvalidArgument; nothing else."""
    try:
        packed = pack_inputs(request, model)
    except InvalidArgument:
        return
    (tensor,) = packed.tensors
    count = prod(tensor.shape)
    if tensor.datatype == "BYTES":
        offset, found = 0, 0
        while offset < len(tensor.data):
            offset += 4 + struct.unpack_from("<I", tensor.data, offset)[0]
            found += 1
        assert (offset, found) == (len(tensor.data), count)
        return
    assert len(tensor.data) == count * ITEMSIZE[tensor.datatype]
    field = CONTENTS_FIELD.get(tensor.datatype)
    values = getattr(request.inputs[0].contents, field) if field else []
    if not request.raw_input_contents and tensor.datatype not in ("BOOL", "FP32", "FP64"):
        decoded = np.frombuffer(tensor.data, dtype=NUMPY_BY_KSERVE[tensor.datatype])
        assert decoded.tolist() == list(values), "typed integer contents changed on the way to the queue"


def int8_out_of_range() -> tuple[ModelInfo, Request]:
    """Regression: numpy refused to cast 128 to INT8 (OverflowError, answered INTERNAL)."""
    request = Request(model_name="synthetic")
    request.inputs.add(name="x", datatype="INT8", shape=[2, 2]).contents.int_contents.extend([0, 0, 0, 128])
    return synthetic_model("INT8", 0, (2, 2)), request


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(case=codec_cases())
@example(case=int8_out_of_range())
def test_codec_answers_invalid_argument_for_any_datatype(case: tuple[ModelInfo, Request]) -> None:
    check_packed(*case)


# ------------------------------------------------------------ memory


Spoiler = Callable[[Request, int, random.Random], None]


def _unknown_model(request: Request, i: int, rng: random.Random) -> None:
    request.model_name = f"no-such-model-{i}"


def _unknown_version(request: Request, i: int, rng: random.Random) -> None:
    request.model_version = str(rng.randrange(2, 2**62))


def _wrong_datatype(request: Request, i: int, rng: random.Random) -> None:
    request.inputs[0].datatype = rng.choice([d for d in KSERVE_DATATYPES if d != "FP32"] + list(GARBAGE_DATATYPES))


def _wrong_shape(request: Request, i: int, rng: random.Random) -> None:
    request.inputs[0].shape[:] = [rng.choice(SPECIAL_DIMS) for _ in range(rng.randrange(0, 5))]


def _wrong_byte_length(request: Request, i: int, rng: random.Random) -> None:
    request.raw_input_contents[0] = b"\x00" * rng.choice([0, 4, 508, 516, 1024])


def _extra_raw(request: Request, i: int, rng: random.Random) -> None:
    request.raw_input_contents.append(b"\x00" * 8)


def _unknown_input(request: Request, i: int, rng: random.Random) -> None:
    request.inputs[0].name = f"input-{i}"


def _missing_input(request: Request, i: int, rng: random.Random) -> None:
    request.model_name = "adder_fixed"
    tensor = request.inputs[0]
    tensor.name, tensor.datatype, tensor.shape[:] = "a", "INT64", [1, 4]
    request.raw_input_contents[0] = b"\x00" * 32


def _typed_count(request: Request, i: int, rng: random.Random) -> None:
    del request.raw_input_contents[:]
    request.inputs[0].contents.fp32_contents.extend([1.0] * rng.choice([0, 127, 129]))


def _unknown_output(request: Request, i: int, rng: random.Random) -> None:
    request.outputs.add(name=f"output-{i}")


def _broken_bytes(request: Request, i: int, rng: random.Random) -> None:
    request.inputs[0].datatype = "BYTES"
    request.raw_input_contents[0] = rng.choice(BROKEN_BYTES[:3])


def _odd_parameters_huge_batch(request: Request, i: int, rng: random.Random) -> None:
    request.parameters[f"param-{i}"].string_param = f"value-{i}"
    request.parameters["priority"].int64_param = -rng.randrange(1, 2**62)
    request.inputs[0].shape[0] = 2**40


SPOILERS: tuple[Spoiler, ...] = (
    _unknown_model,
    _unknown_version,
    _wrong_datatype,
    _wrong_shape,
    _wrong_byte_length,
    _extra_raw,
    _unknown_input,
    _missing_input,
    _typed_count,
    _unknown_output,
    _broken_bytes,
    _odd_parameters_huge_batch,
)


def malformed_requests(count: int, seed: int) -> list[Request]:
    """``count`` cheap malformed requests (mlp-sized), deterministic, with unique
    strings wherever a client chooses them: model, input, output and parameter names, ids."""
    rng = random.Random(seed)
    base = Request(model_name="mlp")
    base.inputs.add(name="features", datatype="FP32", shape=[2, 64])
    base.raw_input_contents.append(b"\x00" * 512)
    requests = []
    for i in range(count):
        request = Request()
        request.CopyFrom(base)
        request.id = f"fuzz-{i}"
        SPOILERS[i % len(SPOILERS)](request, i, rng)
        requests.append(request)
    return requests


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def send_all(stub: pb_grpc.GRPCInferenceServiceStub, requests: list[Request], window: int = 32) -> None:
    """Send every request (up to ``window`` in flight); each must be refused as the oracle says."""
    for start in range(0, len(requests), window):
        chunk = requests[start : start + window]
        futures = [stub.ModelInfer.future(request, timeout=RPC_TIMEOUT_S) for request in chunk]
        for request, future in zip(chunk, futures, strict=True):
            error = future.exception()
            assert error is not None, f"a malformed request was answered OK: {request.id}"
            assert error.code() == expected_code(request), f"{request.id}: {error.code().name}: {error.details()}"


def test_memory_stays_flat_over_ten_thousand_malformed_requests(live: LiveMesh) -> None:
    """Warm up untraced, then trace: what is still allocated at the end is growth."""
    requests = malformed_requests(MEMORY_REQUESTS, seed=4)
    send_all(live.stub, requests[:MEMORY_WARM_UP])
    gc.collect()
    rss_before = rss_bytes()
    tracemalloc.start()
    try:
        send_all(live.stub, requests[MEMORY_WARM_UP:])
        gc.collect()
        traced_growth = tracemalloc.get_traced_memory()[0]
        top = tracemalloc.take_snapshot().statistics("lineno")[:5]
    finally:
        tracemalloc.stop()
    rss_after = rss_bytes()

    print(
        f"over requests {MEMORY_WARM_UP}..{MEMORY_REQUESTS}: Python heap +{traced_growth / 1e6:.2f} MB (traced), "
        f"RSS {rss_before / 1e6:.1f} -> {rss_after / 1e6:.1f} MB"
    )
    assert traced_growth < MEMORY_GROWTH_LIMIT_BYTES, "grew most at:\n" + "\n".join(map(str, top))
    assert rss_after - rss_before < RSS_GROWTH_LIMIT_BYTES
    check_still_serving(live)
