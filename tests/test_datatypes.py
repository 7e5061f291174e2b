"""Every datatype the gateway accepts round-trips through the real mesh and equals
in-process ONNX Runtime on the same model: raw contents, and typed contents where
the protocol has a typed field. Strings (BYTES) are checked for ASCII, UTF-8, empty
and embedded NUL, and bytes that are not UTF-8 are refused naming the input.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto
from redis.asyncio import Redis

from meshserve.models.repository import RepositoryError, load_model
from meshserve.wire.codec import from_array, to_array
from meshserve.wire.dtypes import NUMPY_BY_KSERVE
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from protos import meshserve_pb2 as mpb
from tests.dtype_models import (
    IDENTITY_DATATYPES,
    LOWERCASE,
    build_identity,
    identity_name,
    write_dtype_repository,
    write_model,
)
from tests.support import Mesh, infer_stub, start_mesh, stop_mesh

RPC_TIMEOUT_S = 10
TYPED_FIELD = {
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
}
WORDS = ["HeLLo", "WORLD Été", "", "ΑΒΓ Straße", "NUL\x00INSIDE", "x" * 1000, "😀 EMOJI"]


@pytest.fixture(scope="module")
def dtype_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dtype_repository(tmp_path_factory.mktemp("dtypes"))


@pytest.fixture
async def dtype_mesh(redis: Redis, redis_url: str, dtype_repository: Path) -> AsyncIterator[Mesh]:
    mesh = await start_mesh(redis_url, dtype_repository)
    try:
        yield mesh
    finally:
        await stop_mesh(mesh)


@pytest.fixture
async def dtype_stub(dtype_mesh: Mesh) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    async with grpc.aio.insecure_channel(dtype_mesh.address) as channel:
        yield infer_stub(channel)


def reference(repository: Path, model: str, feed: dict[str, np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
    session = ort.InferenceSession(str(repository / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return [np.asarray(out) for out in session.run(None, feed)]


def edge_values(datatype: str) -> np.ndarray[Any, Any]:
    """Two rows of three: the type's extremes, zero and small values."""
    dtype = NUMPY_BY_KSERVE[datatype]
    if datatype == "BOOL":
        return np.array([[True, False, True], [False, False, True]])
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.array([[info.min, info.max, 0], [1, info.max - 1, info.min + 1]], dtype=dtype)
    info_f = np.finfo(dtype)
    return np.array([[info_f.min, info_f.max, -0.0], [info_f.tiny, np.inf, -np.inf]], dtype=dtype)


def encode_strings(items: list[bytes]) -> bytes:
    """Raw BYTES as tritonclient sends them: each element after its 4-byte LE length."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def decode_strings(raw: bytes) -> list[bytes]:
    items, offset = [], 0
    while offset < len(raw):
        (length,) = struct.unpack_from("<I", raw, offset)
        items.append(raw[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return items


def request_for(
    model: str, name: str, datatype: str, values: Any, shape: list[int], typed: bool
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    if datatype == "BYTES":
        if typed:
            tensor.contents.bytes_contents.extend(values)
        else:
            request.raw_input_contents.append(encode_strings(values))
    elif typed:
        getattr(tensor.contents, TYPED_FIELD[datatype]).extend(values.ravel().tolist())
    else:
        request.raw_input_contents.append(values.tobytes())
    return request


def output_of(response: pb.ModelInferResponse) -> tuple[str, list[int], bytes]:
    assert len(response.outputs) == 1
    assert len(response.raw_output_contents) == 1
    out = response.outputs[0]
    return out.datatype, list(out.shape), response.raw_output_contents[0]


# ------------------------------------------------------------ numeric datatypes


@pytest.mark.parametrize("typed", [False, True], ids=["raw", "typed"])
async def test_every_numeric_datatype_round_trips_equal_to_onnx_runtime(
    dtype_stub: pb_grpc.GRPCInferenceServiceStub, dtype_repository: Path, typed: bool
) -> None:
    numeric = [d for d in IDENTITY_DATATYPES if d != "BYTES" and not (typed and d == "FP16")]
    requests = {}
    for datatype in numeric:
        values = edge_values(datatype)
        # two requests at once, so that the worker may stack them into one batch
        requests[datatype] = (
            values,
            [request_for(identity_name(datatype), "x", datatype, v, [1, 3], typed) for v in values[:, None]],
        )
    calls = [dtype_stub.ModelInfer(r, timeout=RPC_TIMEOUT_S) for _, rs in requests.values() for r in rs]
    responses = iter(await asyncio.gather(*calls))
    for datatype, (values, _) in requests.items():
        expected = reference(dtype_repository, identity_name(datatype), {"x": values})[0]
        got = []
        for _ in range(2):
            out_datatype, shape, raw = output_of(next(responses))
            assert (out_datatype, shape) == (datatype, [1, 3]), datatype
            got.append(np.frombuffer(raw, dtype=NUMPY_BY_KSERVE[datatype]).reshape(1, 3))
        assert np.concatenate(got).tobytes() == expected.tobytes(), datatype


async def test_fp16_typed_contents_are_refused_naming_the_input(dtype_stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = pb.ModelInferRequest(model_name=identity_name("FP16"))
    request.inputs.add(name="x", datatype="FP16", shape=[1, 3]).contents.fp32_contents.extend([1.0, 2.0, 3.0])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await dtype_stub.ModelInfer(request, timeout=RPC_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'x'" in (caught.value.details() or "")


async def test_raw_bool_bytes_other_than_0_or_1_are_refused(dtype_stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = request_for(identity_name("BOOL"), "x", "BOOL", np.zeros((1, 3), np.bool_), [1, 3], typed=False)
    request.raw_input_contents[0] = bytes([1, 0, 2])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await dtype_stub.ModelInfer(request, timeout=RPC_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'x': BOOL element 2 is byte 2" in (caught.value.details() or "")
    request.raw_input_contents[0] = bytes([1, 0, 1])
    response = await dtype_stub.ModelInfer(request, timeout=RPC_TIMEOUT_S)
    assert output_of(response) == ("BOOL", [1, 3], bytes([1, 0, 1]))


def test_a_bf16_model_is_refused_by_the_repository_naming_the_tensor(tmp_path: Path) -> None:
    """ONNX Runtime's Python API has no bfloat16 arrays: such a model could load but
    never answer, so the repository refuses it with a reason instead."""
    path = write_model(tmp_path, "identity_bf16", build_identity(TensorProto.BFLOAT16))
    with pytest.raises(RepositoryError, match=r"'x'.*BF16"):
        load_model(path.parent.parent, 1)


# ------------------------------------------------------------ strings


@pytest.mark.parametrize("typed", [False, True], ids=["raw", "typed"])
async def test_strings_come_back_equal_to_onnx_runtime(
    dtype_stub: pb_grpc.GRPCInferenceServiceStub, dtype_repository: Path, typed: bool
) -> None:
    encoded = [word.encode() for word in WORDS]
    batch = request_for(LOWERCASE, "text", "BYTES", encoded, [len(encoded)], typed)
    singles = [request_for(LOWERCASE, "text", "BYTES", [item], [1], typed) for item in encoded]
    responses = await asyncio.gather(*(dtype_stub.ModelInfer(r, timeout=RPC_TIMEOUT_S) for r in [batch, *singles]))
    (expected,) = reference(dtype_repository, LOWERCASE, {"text": np.array(WORDS, dtype=np.object_)})
    expected_bytes = [str(s).encode() for s in expected]
    assert expected_bytes[:2] == [b"hello", "world été".encode()]
    datatype, shape, raw = output_of(responses[0])
    assert (datatype, shape) == ("BYTES", [len(WORDS)])
    assert decode_strings(raw) == expected_bytes
    for response, want in zip(responses[1:], expected_bytes, strict=True):
        assert output_of(response) == ("BYTES", [1], encode_strings([want]))


async def test_strings_pass_through_unchanged(dtype_stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    """Identity on strings: every valid UTF-8 element comes back byte for byte."""
    encoded = [word.encode() for word in WORDS[:6]]
    for typed in (False, True):
        request = request_for(identity_name("BYTES"), "x", "BYTES", encoded, [2, 3], typed)
        response = await dtype_stub.ModelInfer(request, timeout=RPC_TIMEOUT_S)
        assert output_of(response) == ("BYTES", [2, 3], encode_strings(encoded))


@pytest.mark.parametrize("typed", [False, True], ids=["raw", "typed"])
async def test_bytes_that_are_not_utf8_are_refused_naming_the_input(
    dtype_stub: pb_grpc.GRPCInferenceServiceStub, typed: bool
) -> None:
    request = request_for(LOWERCASE, "text", "BYTES", [b"fine", b"\xff\xfe binary"], [2], typed)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await dtype_stub.ModelInfer(request, timeout=RPC_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details() or ""
    assert "input 'text': BYTES element 1 is not valid UTF-8" in details, details


# ------------------------------------------------------------ class_count


@pytest.mark.parametrize("key", ["classification", "class_count"])  # tritonclient's name, and the hand-written one
async def test_class_count_answers_the_top_classes(dtype_stub: pb_grpc.GRPCInferenceServiceStub, key: str) -> None:
    """Triton's classification extension (tests/test_classification.py has the rest):
    the output's top k as BYTES "value:index", and 0 is refused, not taken for "off"."""
    values = np.array([[0.5, -2.0, 3.25]], np.float32)
    request = request_for(identity_name("FP32"), "x", "FP32", values, [1, 3], typed=False)
    request.outputs.add(name="y").parameters[key].int64_param = 2
    response = await dtype_stub.ModelInfer(request, timeout=RPC_TIMEOUT_S)
    assert output_of(response) == ("BYTES", [1, 2], encode_strings([b"3.250000:2", b"0.500000:0"]))
    metadata = await dtype_stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=RPC_TIMEOUT_S)
    assert "classification" in metadata.extensions
    request.outputs[0].parameters[key].int64_param = 0
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await dtype_stub.ModelInfer(request, timeout=RPC_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"'{key}'" in (caught.value.details() or "")
    assert "'y'" in (caught.value.details() or "")


async def test_class_count_of_a_bytes_output_is_refused(dtype_stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = request_for(LOWERCASE, "text", "BYTES", [b"ab"], [1], typed=False)
    request.outputs.add(name="lower").parameters["classification"].int64_param = 1
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await dtype_stub.ModelInfer(request, timeout=RPC_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "requested output 'lower'" in (caught.value.details() or "")
    assert "BYTES output" in (caught.value.details() or "")


# ------------------------------------------------------------ the codec alone


def test_worker_decodes_strings_for_onnx_runtime_and_encodes_outputs_back() -> None:
    """ONNX Runtime takes tensor(string) as an object array of str (bytes would be str()-ed)."""
    data = encode_strings([b"HeLLo", "Été".encode(), b""])
    array = to_array(mpb.Tensor(name="text", datatype="BYTES", shape=[3], data=data))
    assert array.dtype == np.object_
    assert array.tolist() == ["HeLLo", "Été", ""]
    _, back = from_array("lower", "BYTES", np.array(["hello", "été", b"\xff raw"], dtype=np.object_))
    assert bytes(back) == encode_strings([b"hello", "été".encode(), b"\xff raw"])
