"""The envelopes between gateway and worker: the batch items and shape signature
the gateway computed are what the worker batches by, and a reply's status maps to
the error tree and back."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from meshserve import errors
from meshserve.models.repository import ModelInfo, TensorInfo
from meshserve.queue import ModelKeys, QueueProtocol
from meshserve.store.link import RedisLink
from meshserve.wire.codec import PackedInputs, pack_inputs
from meshserve.wire.envelope import envelope_items, envelope_signature, failed_reply, reply_error
from model_workers.batches import decode
from protos import grpc_service_pb2 as pb
from protos import meshserve_pb2 as mpb

FAR_MS = 10**13  # a deadline far in the future (epoch ms)


def model_of(shape: tuple[int, ...], max_batch_size: int = 0) -> ModelInfo:
    """A one-input FP32 model (max_batch_size 0: it does not batch)."""
    return ModelInfo(
        name="fixed" if max_batch_size == 0 else "batching",
        version=1,
        path=Path("unused.onnx"),
        inputs=(TensorInfo("x", "FP32", shape),),
        outputs=(TensorInfo("y", "FP32", shape),),
        max_batch_size=max_batch_size,
        max_queue_delay_us=0,
        preferred_batch_sizes=(),
        max_queue_size=0,
    )


def packed_request(model: ModelInfo, shape: list[int]) -> PackedInputs:
    request = pb.ModelInferRequest(model_name=model.name)
    request.inputs.add(name="x", datatype="FP32", shape=shape)
    request.raw_input_contents.append(np.zeros(shape, dtype=np.float32).tobytes())
    return pack_inputs(request, model)


async def test_a_non_batching_request_is_one_item_whatever_its_dim_0(link: RedisLink) -> None:
    model = model_of((3, 4))  # dim 0 is 3, but it is part of the shape, not a batch
    packed = packed_request(model, [3, 4])
    assert packed.batch_size == 1
    envelope = mpb.QueuedRequest(
        id="j", model=model.name, version=1, deadline_ms=FAR_MS, inputs=packed.tensors,
        items=packed.batch_size, shape_signature=packed.signature,
    )  # fmt: skip
    queue, keys = QueueProtocol(link), ModelKeys.for_model(model.name, model.version)
    await queue.enqueue(
        keys, "j", tier=1, payload=envelope.SerializeToString(), deadline_ms=FAR_MS, tenant="t", reply_to="r",
        signature=packed.signature, max_queue_size=0, items=packed.batch_size,
    )  # fmt: skip
    claim = await queue.claim(keys, max_items=1, lease_ms=60_000, worker_id="w")
    [job] = decode(claim, model)
    assert job.batch_size == packed.batch_size  # the worker counts what the gateway charged the queue


@pytest.mark.parametrize(("shape", "max_batch_size"), [([3, 4], 0), ([5, 2, 3], 8)])
def test_an_older_gateways_envelope_gets_the_same_figures(shape: list[int], max_batch_size: int) -> None:
    model = model_of(tuple(-1 if i == 0 and max_batch_size else d for i, d in enumerate(shape)), max_batch_size)
    packed = packed_request(model, shape)
    current = mpb.QueuedRequest(inputs=packed.tensors, items=packed.batch_size, shape_signature=packed.signature)
    older = mpb.QueuedRequest(inputs=packed.tensors)  # no items, no signature
    for envelope in (current, older):
        assert envelope_items(envelope, model) == packed.batch_size
        assert envelope_signature(envelope, model) == packed.signature
    assert (packed.batch_size, packed.signature) == ((1, "") if max_batch_size == 0 else (5, "2,3"))


@pytest.mark.parametrize(
    "error_class",
    [
        errors.InvalidArgument,
        errors.Unauthenticated,
        errors.PermissionDenied,
        errors.NotFound,
        errors.ResourceExhausted,
        errors.DeadlineExceeded,
        errors.Unavailable,
        errors.Internal,
    ],
)
def test_a_reply_carries_an_error_across_redis(error_class: type[errors.MeshError]) -> None:
    reply = mpb.InferReply.FromString(failed_reply("j", error_class("input 'x': wrong")).SerializeToString())
    assert (reply.id, reply.code, reply.message) == ("j", error_class.code.value[0], "input 'x': wrong")
    error = reply_error(reply)
    assert type(error) is error_class
    assert error.message == "input 'x': wrong"


def test_an_ok_reply_carries_no_error_and_a_status_outside_the_tree_reads_internal() -> None:
    assert reply_error(mpb.InferReply(id="j")) is None
    for number in (grpc.StatusCode.ABORTED.value[0], 99):  # a status no error raises; one a newer peer might send
        error = reply_error(mpb.InferReply(id="j", code=number, message="m"))  # type: ignore[arg-type]
        assert isinstance(error, errors.Internal)


def test_the_code_enum_reads_the_int32_it_replaced() -> None:
    """An older worker wrote ``code`` as int32 field 2: the same bytes (varint)."""
    older_bytes = bytes([0x0A, 0x01, ord("j"), 0x10, 14])  # id = "j", code = 14 (UNAVAILABLE) as int32
    reply = mpb.InferReply.FromString(older_bytes)
    assert reply.code == mpb.UNAVAILABLE
    assert isinstance(reply_error(reply), errors.Unavailable)
    assert failed_reply("j", errors.Unavailable("")).SerializeToString() == older_bytes
