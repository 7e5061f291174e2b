"""Bad input gets a precise error through the gateway, over real gRPC (invariant 5).

Every rejection is checked for its status code and for a message that names the
field at fault, and for leaving nothing behind in Redis: a rejected request is
never queued. The accepted forms (raw and typed contents, a fixed-shape model, a
model with free spatial dims) are checked against the models' known arithmetic.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from redis.asyncio import Redis

from meshserve.devkit.examples import write_example_repository
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from tests.support import (
    hold_serving,
    infer_request,
    infer_stub,
    output_arrays,
    queue_leftovers,
    release_serving,
    start_mesh,
    stop_mesh,
    wait_queued,
)

InferTensor = pb.ModelInferRequest.InferInputTensor
RPC_TIMEOUT_S = 10


def features(batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 64)).astype(np.float32)


def mlp_reference(model_repository: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(
        str(model_repository / "mlp" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    logits, probabilities = session.run(["logits", "probabilities"], {"features": x})
    return {"logits": logits, "probabilities": probabilities}


# ------------------------------------------------------------ rejected requests


def _unknown_input(request: pb.ModelInferRequest) -> None:
    request.inputs[0].name = "feats"


def _missing_input(request: pb.ModelInferRequest) -> None:
    del request.inputs[:]
    del request.raw_input_contents[:]


def _duplicate_input(request: pb.ModelInferRequest) -> None:
    request.inputs.add().CopyFrom(request.inputs[0])
    request.raw_input_contents.append(request.raw_input_contents[0])


def _wrong_datatype(request: pb.ModelInferRequest) -> None:
    request.inputs[0].datatype = "FP64"
    request.raw_input_contents[0] = features().astype(np.float64).tobytes()


def _no_datatype(request: pb.ModelInferRequest) -> None:
    request.inputs[0].datatype = ""


def _wrong_rank(request: pb.ModelInferRequest) -> None:
    request.inputs[0].shape[:] = [2, 8, 8]


def _wrong_fixed_dim(request: pb.ModelInferRequest) -> None:
    request.inputs[0].shape[:] = [2, 63]
    request.raw_input_contents[0] = np.zeros((2, 63), np.float32).tobytes()


def _negative_dim(request: pb.ModelInferRequest) -> None:
    request.inputs[0].shape[:] = [-1, 64]


def _empty_batch(request: pb.ModelInferRequest) -> None:
    request.inputs[0].shape[:] = [0, 64]
    request.raw_input_contents[0] = b""


def _short_raw(request: pb.ModelInferRequest) -> None:
    request.raw_input_contents[0] = request.raw_input_contents[0][:-4]


def _extra_raw(request: pb.ModelInferRequest) -> None:
    request.raw_input_contents.append(b"\0" * 16)


def _batch_too_large(request: pb.ModelInferRequest) -> None:
    request.inputs[0].shape[:] = [33, 64]
    request.raw_input_contents[0] = features(33).tobytes()


def _raw_and_contents(request: pb.ModelInferRequest) -> None:
    request.inputs[0].contents.fp32_contents.extend(features().ravel().tolist())


def _typed_count(request: pb.ModelInferRequest) -> None:
    del request.raw_input_contents[:]
    request.inputs[0].contents.fp32_contents.extend(features().ravel()[:-1].tolist())


def _unknown_output(request: pb.ModelInferRequest) -> None:
    request.outputs.add(name="embedding")


INVALID_MLP_REQUESTS: dict[str, tuple[Callable[[pb.ModelInferRequest], None], str]] = {
    "unknown input": (_unknown_input, "input 'feats' is not an input of model 'mlp' (inputs: features)"),
    "missing input": (_missing_input, "input 'features' of model 'mlp' is missing"),
    "duplicate input": (_duplicate_input, "input 'features' is given more than once"),
    "wrong datatype": (_wrong_datatype, "input 'features': expected FP32, got FP64"),
    "no datatype": (_no_datatype, "input 'features': expected FP32, got no datatype"),
    "wrong rank": (_wrong_rank, "input 'features': expected rank 2 shape [-1, 64], got [2, 8, 8]"),
    "wrong fixed dim": (_wrong_fixed_dim, "input 'features': dim 1 must be 64, got 63"),
    "negative dim": (_negative_dim, "input 'features': dim 0 is negative (-1)"),
    "empty batch": (_empty_batch, "input 'features': batch size must be at least 1"),
    "raw byte length": (_short_raw, "input 'features': shape [2, 64] FP32 needs 512 bytes, got 508"),
    "raw count": (_extra_raw, "raw_input_contents has 2 entries for 1 inputs"),
    "batch over max": (_batch_too_large, "input 'features': batch size 33 exceeds max_batch_size 32 of model 'mlp'"),
    "raw and typed": (_raw_and_contents, "input 'features': set either contents or raw_input_contents, not both"),
    "typed count": (_typed_count, "input 'features': shape [2, 64] has 128 elements, contents has 127"),
    "unknown output": (_unknown_output, "requested output 'embedding' is not an output of model 'mlp'"),
}


@pytest.mark.parametrize("case", sorted(INVALID_MLP_REQUESTS))
async def test_invalid_mlp_request_is_invalid_argument_and_never_queued(
    case: str, stub: pb_grpc.GRPCInferenceServiceStub, redis: Redis
) -> None:
    spoil, detail = INVALID_MLP_REQUESTS[case]
    request = infer_request("mlp", {"features": features()})
    spoil(request)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ModelInfer(request, timeout=RPC_TIMEOUT_S)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert detail in (caught.value.details() or "")
    assert await redis.keys("ms:{m:*") == []


@pytest.mark.parametrize(
    ("model", "version", "detail"),
    [
        ("nope", "", "unknown model 'nope'"),
        ("nope", "1", "unknown model 'nope'"),
        ("mlp", "7", "unknown version '7' of model 'mlp'"),
        ("mlp", "latest", "unknown version 'latest' of model 'mlp'"),
    ],
)
async def test_unknown_model_or_version_is_not_found(
    model: str, version: str, detail: str, stub: pb_grpc.GRPCInferenceServiceStub, redis: Redis
) -> None:
    request = infer_request(model, {"features": features()}, version=version)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ModelInfer(request, timeout=RPC_TIMEOUT_S)

    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert detail in (caught.value.details() or "")
    assert await redis.keys("ms:{m:*") == []


async def test_fixed_model_rejects_a_missing_input_and_a_batch_dim(
    stub: pb_grpc.GRPCInferenceServiceStub, redis: Redis
) -> None:
    a = np.arange(4, dtype=np.int64).reshape(1, 4)
    only_a = infer_request("adder_fixed", {"a": a})
    batched = infer_request("adder_fixed", {"a": np.vstack([a, a]), "b": np.vstack([a, a])})
    raw_for_one = infer_request("adder_fixed", {"a": a, "b": a})
    del raw_for_one.raw_input_contents[1:]

    for request, detail in [
        (only_a, "input 'b' of model 'adder_fixed' is missing"),
        (batched, "input 'a': dim 0 must be 1, got 2"),
        (raw_for_one, "raw_input_contents has 1 entries for 2 inputs"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ModelInfer(request, timeout=RPC_TIMEOUT_S)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, detail
        assert detail in (caught.value.details() or "")
    assert await redis.keys("ms:{m:*") == []


async def test_message_over_the_gateway_limit_is_resource_exhausted(
    redis: Redis, redis_url: str, model_repository: Path
) -> None:
    mesh = await start_mesh(redis_url, model_repository, max_message_bytes=4096)
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            small = await stub.ModelInfer(infer_request("mlp", {"features": features(2)}), timeout=RPC_TIMEOUT_S)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ModelInfer(infer_request("mlp", {"features": features(32)}), timeout=RPC_TIMEOUT_S)
    finally:
        await stop_mesh(mesh)

    assert output_arrays(small)["logits"].shape == (2, 10)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "Received message larger than max" in (caught.value.details() or "")
    assert await queue_leftovers(redis) == []


async def test_full_queue_is_resource_exhausted(redis: Redis, redis_url: str, tmp_path: Path) -> None:
    repository = write_example_repository(tmp_path, ["mlp"])
    (repository / "mlp" / "config.yaml").write_text("dynamic_batching:\n  max_queue_size: 2\n")
    mesh = await start_mesh(redis_url, repository)
    worker = mesh.workers[0]
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            await hold_serving(worker)
            try:
                queued = asyncio.gather(
                    *(stub.ModelInfer(infer_request("mlp", {"features": features()}), timeout=10) for _ in range(2))
                )
                await wait_queued(redis, "mlp", 2)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.ModelInfer(infer_request("mlp", {"features": features()}), timeout=RPC_TIMEOUT_S)
                job_keys = [key for key in await queue_leftovers(redis) if ":job:" in key]
            finally:
                release_serving(worker)
            await queued
    finally:
        await stop_mesh(mesh)

    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue of model 'mlp' is full (2 requests waiting)" in (caught.value.details() or "")
    assert len(job_keys) == 2  # the refused request left no job behind
    assert await queue_leftovers(redis) == []


# ------------------------------------------------------------ accepted forms


async def test_typed_contents_give_the_same_result_as_raw(
    stub: pb_grpc.GRPCInferenceServiceStub, model_repository: Path, redis: Redis
) -> None:
    x = features(3, seed=7)
    typed = pb.ModelInferRequest(
        model_name="mlp",
        inputs=[
            InferTensor(
                name="features",
                datatype="FP32",
                shape=[3, 64],
                contents=pb.InferTensorContents(fp32_contents=x.ravel().tolist()),
            )
        ],
    )

    from_raw = output_arrays(await stub.ModelInfer(infer_request("mlp", {"features": x}), timeout=RPC_TIMEOUT_S))
    from_typed = output_arrays(await stub.ModelInfer(typed, timeout=RPC_TIMEOUT_S))

    expected = mlp_reference(model_repository, x)
    assert set(from_typed) == {"logits", "probabilities"}
    for name in expected:
        np.testing.assert_array_equal(from_typed[name], from_raw[name])
        np.testing.assert_allclose(from_typed[name], expected[name], rtol=1e-5, atol=1e-6)
    assert await queue_leftovers(redis) == []


async def test_requested_output_only_is_returned(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    response = await stub.ModelInfer(
        infer_request("mlp", {"features": features()}, outputs=["probabilities"]), timeout=RPC_TIMEOUT_S
    )

    outputs = output_arrays(response)
    assert list(outputs) == ["probabilities"]
    np.testing.assert_allclose(outputs["probabilities"].sum(axis=1), 1.0, rtol=1e-5)


async def test_fixed_shape_adder_adds_and_subtracts_raw_and_typed(
    stub: pb_grpc.GRPCInferenceServiceStub, redis: Redis
) -> None:
    a = np.array([[1, -2, 3, 2**40]], dtype=np.int64)
    b = np.array([[10, 20, -30, 5]], dtype=np.int64)
    typed = pb.ModelInferRequest(
        model_name="adder_fixed",
        model_version="1",
        inputs=[
            InferTensor(name=name, datatype="INT64", shape=[1, 4], contents=pb.InferTensorContents(int64_contents=v))
            for name, v in (("b", b.ravel().tolist()), ("a", a.ravel().tolist()))
        ],
    )

    raw_out = output_arrays(await stub.ModelInfer(infer_request("adder_fixed", {"a": a, "b": b}), timeout=10))
    typed_response = await stub.ModelInfer(typed, timeout=RPC_TIMEOUT_S)
    typed_out = output_arrays(typed_response)

    for outputs in (raw_out, typed_out):
        assert outputs["sum"].dtype == np.int64
        np.testing.assert_array_equal(outputs["sum"], a + b)
        np.testing.assert_array_equal(outputs["diff"], a - b)
    assert typed_response.model_name == "adder_fixed"
    assert typed_response.model_version == "1"
    assert await queue_leftovers(redis) == []


async def test_any_size_model_serves_two_spatial_sizes(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    rng = np.random.default_rng(3)
    for shape in [(1, 1, 4, 6), (2, 1, 9, 3)]:
        image = rng.standard_normal(shape).astype(np.float32)

        response = await stub.ModelInfer(infer_request("scale_any", {"image": image}), timeout=RPC_TIMEOUT_S)

        scaled = output_arrays(response)["scaled"]
        assert scaled.shape == shape
        np.testing.assert_allclose(scaled, image * 2 + 1, rtol=1e-6)
