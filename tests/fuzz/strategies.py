"""Hypothesis strategies: requests for the example models (valid, then spoiled by
mutations), parameters, tensors of every KServe datatype for the codec alone."""

from __future__ import annotations

import struct
from collections.abc import Callable
from math import prod
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import strategies as st
from hypothesis.strategies import DrawFn

from meshserve.models.repository import ModelInfo, TensorInfo
from protos import grpc_service_pb2 as pb
from tests.fuzz.oracle import (
    CONTENTS_FIELD,
    CONTENTS_FIELDS,
    ITEMSIZE,
    KSERVE_DATATYPES,
    MAX_MESSAGE_BYTES,
    MODELS,
    NUMPY_DTYPE,
    RPC_TIMEOUT_S,
    TINY_TIMEOUT_US,
    InferTensor,
    Request,
    contents_counts,
)

Mutation = Callable[[DrawFn, Request], None]

OTHER_INPUT_NAMES = ("features", "image", "a", "b", "", "A", "image ", "x", "a\x00", "\u00e9")
OUTPUT_NAMES = ("logits", "probabilities", "sum", "diff", "scaled", "", "embedding", "LOGITS", "logits\n")
BAD_MODEL_NAMES = ("", "nope", "MLP", "mlp ", " mlp", "mlp\x00", "mlp/1", "../mlp", "*", "cnn\u200b", "m" * 10_000)
BAD_VERSIONS = ("0", "2", "-1", "1.0", "1e0", "one", "latest", "0x1", "1 2", str(2**63), str(2**64), "9" * 5000)
ODD_VERSIONS = (" 1", "+1", "01", "1\n", "\u0661")  # int() takes these as 1
GARBAGE_DATATYPES = ("", "fp32", "FLOAT", "FP32 ", " FP32", "TYPE_FP32", "INT", "STRING", "FP8", "FP32\x00", "INT64;")
SPECIAL_DIMS = (-(2**63), -(2**31), -2, -1, 0, 1, 2, 3, 4, 31, 32, 33, 64, 2**31, 2**32, 2**40, 2**62, 2**63 - 1)
PARAMETER_KEYS = ("priority", "timeout", "sequence_id", "binary_data_output", "", "Priority", "timeout ", "class_count")

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


STRING_EDGES = ("", "HeLLo", "WORLD Été", "NUL\x00INSIDE", "ΑΒΓ Straße", "😀", "x" * 300)
"""Strings past 127 bytes have a length prefix with a byte >= 0x80 (not ASCII)."""


def _strings(draw: DrawFn, count: int) -> list[bytes]:
    """UTF-8 strings: any text (NUL and non-ASCII included) or the edge cases."""
    text = st.one_of(st.sampled_from(STRING_EDGES), st.text(max_size=12))
    return [s.encode() for s in draw(st.lists(text, min_size=count, max_size=count))]


def _values(draw: DrawFn, datatype: str, shape: list[int]) -> np.ndarray[Any, Any]:
    """Tensor values: random small ints (exact in FP32 too) or one edge value;
    BYTES: an object array of UTF-8 encoded strings."""
    if datatype == "BYTES":
        return np.array(_strings(draw, prod(shape)) or [], dtype=np.object_).reshape(shape)
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
        elif datatype == "BYTES":
            request.raw_input_contents.append(_encode_bytes(values.ravel().tolist()))
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


FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "bool_contents": st.booleans(),
    "int_contents": st.integers(-(2**31), 2**31 - 1),
    "int64_contents": int64s,
    "uint_contents": st.integers(0, 2**32 - 1),
    "uint64_contents": uint64s,
    "fp32_contents": st.floats(width=32),
    "fp64_contents": st.floats(),
    "bytes_contents": st.one_of(st.binary(max_size=8), st.text(max_size=8).map(str.encode)),
}


def typed_contents(draw: DrawFn, request: Request) -> None:
    """Typed contents of any kind, with the right count or one off; raw kept or not."""
    if (index := _pick(draw, request)) is None:
        return
    tensor = request.inputs[index]
    expected = prod(tensor.shape) if tensor.shape and all(0 <= d <= 20_000 for d in tensor.shape) else 4
    count = min(draw(st.sampled_from([expected, expected - 1, expected + 1, 0, 1])), 20_000)
    field = draw(st.sampled_from(CONTENTS_FIELDS))
    getattr(tensor.contents, field).extend([draw(FIELD_VALUES[field])] * max(count, 0))
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
        getattr(tensor.contents, field).extend(draw(st.lists(FIELD_VALUES[field], min_size=size, max_size=size)))
    return model, request
