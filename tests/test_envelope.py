"""The request envelope between gateway and worker: the batch items and shape
signature the gateway computed are what the worker batches by."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from meshserve.models.repository import ModelInfo, TensorInfo
from meshserve.queue import ModelKeys, QueueProtocol
from meshserve.store.link import RedisLink
from meshserve.wire.codec import pack_inputs
from model_workers.batches import decode
from protos import grpc_service_pb2 as pb
from protos import meshserve_pb2 as mpb

FAR_MS = 10**13  # a deadline far in the future (epoch ms)


def fixed_model(shape: tuple[int, ...]) -> ModelInfo:
    """A model that does not batch (max_batch_size 0) with a fixed input shape."""
    return ModelInfo(
        name="fixed",
        version=1,
        path=Path("unused.onnx"),
        inputs=(TensorInfo("x", "FP32", shape),),
        outputs=(TensorInfo("y", "FP32", shape),),
        max_batch_size=0,
        max_queue_delay_us=0,
        preferred_batch_sizes=(),
        max_queue_size=0,
    )


async def test_a_non_batching_request_is_one_item_whatever_its_dim_0(link: RedisLink) -> None:
    model = fixed_model((3, 4))  # dim 0 is 3, but it is part of the shape, not a batch
    request = pb.ModelInferRequest(model_name=model.name)
    request.inputs.add(name="x", datatype="FP32", shape=[3, 4])
    request.raw_input_contents.append(np.zeros((3, 4), dtype=np.float32).tobytes())
    packed = pack_inputs(request, model)
    assert packed.batch_size == 1
    envelope = mpb.QueuedRequest(id="j", model=model.name, version=1, deadline_ms=FAR_MS, inputs=packed.tensors)
    queue, keys = QueueProtocol(link), ModelKeys.for_model(model.name, model.version)
    await queue.enqueue(
        keys, "j", tier=1, payload=envelope.SerializeToString(), deadline_ms=FAR_MS, tenant="t", reply_to="r",
        signature=packed.signature, max_queue_size=0, items=packed.batch_size,
    )  # fmt: skip
    claim = await queue.claim(keys, max_items=1, lease_ms=60_000, worker_id="w")
    [job] = decode(claim, model)
    assert job.batch_size == packed.batch_size  # the worker counts what the gateway charged the queue
