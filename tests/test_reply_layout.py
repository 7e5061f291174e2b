"""Replies laid out as the client's response (meshserve/wire/envelope.py).

The worker writes a successful reply's outputs as the serialized ModelInferResponse
(or ModelStreamInferResponse) after the reply, the gateway's reply link receives that
response straight into a ``bytes`` object (meshserve.store.resp.HeadedBulk), and the
gateway hands it to gRPC as it is. What must hold: the response parses to exactly
what the gateway's own encoding gives (every datatype, BYTES too, a subset of the
outputs, parameters in the head, a stream's framing), however the reply is read;
replies of the older formats (framed, plain) still read; the mesh answers the same
through the laid-out path and when a worker answers framed (an older one).
"""

from __future__ import annotations

import random
import tracemalloc
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
from redis.asyncio import Redis

import gateway.servicer
import model_workers.batches
from meshserve.devkit.examples import write_example_repository
from meshserve.models.repository import ModelInfo, TensorInfo
from meshserve.queue import ClaimedBatch
from meshserve.store.link import Chunks, RedisLink
from meshserve.store.resp import HEAD_PREFIX, HEADED_MARKER, HeadedBulk, RespReader, empty_bytes
from meshserve.wire.codec import encode_infer_response, from_array, response_head, stream_response
from meshserve.wire.dtypes import NUMPY_BY_KSERVE
from meshserve.wire.envelope import frame, lay_out, unframe
from model_workers.batches import decode, serialize_reply, split
from protos import grpc_service_pb2 as pb
from protos import meshserve_pb2 as mpb
from tests.support import infer_request, infer_stub, output_arrays, queue_leftovers, start_mesh, stop_mesh

LARGE = 64  # the reader's threshold in the reader tests: small, so the cases stay small
MIB = 1 << 20
RPC_TIMEOUT_S = 30


def sample(datatype: str, rows: int = 2) -> np.ndarray[Any, Any]:
    """A [rows, 3] array of ``datatype`` with values that exercise it."""
    if datatype == "BYTES":
        words = [b"", b"HeLLo", "WORLD \u00c9t\u00e9".encode(), b"\x00\xffbin", b"a" * 300, b"z"]
        return np.array([words[i % len(words)] for i in range(rows * 3)], dtype=np.object_).reshape(rows, 3)
    if datatype == "BOOL":
        return (np.arange(rows * 3) % 2 == 0).reshape(rows, 3)
    if datatype == "BF16":  # numpy has no bfloat16: its bits
        return (np.arange(rows * 3) * 257 + 16000).astype(np.uint16).reshape(rows, 3)
    dtype = NUMPY_BY_KSERVE[datatype]
    return (np.arange(rows * 3) * 7 - 5).astype(dtype).reshape(rows, 3)


DATATYPES = ["BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "FP16", "FP32", "FP64"]
DATATYPES += ["BF16", "BYTES"]


def raw_of(datatype: str, array: np.ndarray[Any, Any]) -> bytes:
    """The KServe raw encoding of ``array``, written independently of the codec."""
    if datatype == "BYTES":
        return b"".join(len(v).to_bytes(4, "little") + v for v in array.flat)
    if datatype == "BF16":
        return array.astype(np.uint16).tobytes()
    return np.ascontiguousarray(array, dtype=NUMPY_BY_KSERVE[datatype]).tobytes()


def expected_response(
    outputs: list[tuple[str, str, np.ndarray[Any, Any]]], *, version: int, request_id: str = "", **fields: Any
) -> pb.ModelInferResponse:
    """The response built with protobuf's own API: what a client must read."""
    response = pb.ModelInferResponse(model_name="m", model_version=str(version), id=request_id, **fields)
    for name, datatype, array in outputs:
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(raw_of(datatype, array))
    return response


def reply_of(
    outputs: list[tuple[str, str, np.ndarray[Any, Any]]], version: int = 3
) -> tuple[mpb.InferReply, list[Any]]:
    """A worker's successful reply and its outputs' buffers, as ``split`` makes them."""
    reply = mpb.InferReply(id="job-1", model="m", version=version, compute_us=5, worker_id="w")
    data = []
    for name, datatype, array in outputs:
        if datatype == "BF16":  # numpy has no bfloat16: its bits, as the codec carries them
            tensor = mpb.Tensor(name=name, datatype=datatype, shape=array.shape, data_bytes=array.nbytes)
            buffer: Any = array.astype(np.uint16).data.cast("B")
        else:
            tensor, buffer = from_array(name, datatype, array)
        reply.outputs.append(tensor)
        data.append(buffer)
    return reply, data


def wire(payload: bytes | Chunks) -> bytes:
    """What Redis hands the gateway: the payload as one bytes object."""
    return payload if isinstance(payload, bytes) else b"".join(bytes(b) for b in payload.buffers)


def read_headed(payload: bytes, *, large: int = LARGE, cut: int = 4096) -> Any:
    """``payload`` as a reply list element, read by a headed reader in reads of ``cut`` bytes."""
    reader = RespReader(large, headed=True)
    stream = b"*2\r\n$1\r\nr\r\n*1\r\n$%d\r\n%s\r\n" % (len(payload), payload)
    return receive(reader, stream, [cut])[0][1][0]


def receive(reader: RespReader, stream: bytes, cuts: list[int]) -> list[Any]:
    """``stream`` through ``reader`` as a transport would deliver it."""
    replies: list[Any] = []
    position, index = 0, 0
    while position < len(stream):
        target = reader.buffer()
        size = min(cuts[index % len(cuts)], len(target), len(stream) - position)
        index += 1
        target[:size] = stream[position : position + size]
        position += size
        replies.extend(reader.received(size))
    return replies


def laid_out_request(layout: int = mpb.REPLY_INFER_RESPONSE, head: bytes | None = None) -> mpb.QueuedRequest:
    return mpb.QueuedRequest(
        id="job-1",
        reply_to="r",
        reply_layout=layout,
        response_head=response_head("m", "req-1") if head is None else head,
    )


# ------------------------------------------------------------ the layout


@pytest.mark.parametrize("datatype", DATATYPES)
@pytest.mark.parametrize("read", ["one buffer", "headed reader"])
def test_a_laid_out_response_parses_as_the_gateways_own_encoding(datatype: str, read: str) -> None:
    outputs = [("y", datatype, sample(datatype)), ("z", "FP32", np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3))]
    reply, data = reply_of(outputs)
    payload = wire(lay_out(reply, data, laid_out_request()))
    answer = unframe(read_headed(payload) if read == "headed reader" else payload, mpb.InferReply)
    assert answer.response is not None
    if read == "headed reader":  # received into a bytes object of its own, which the views are of
        assert type(answer.response) is bytes
        assert all(view.obj is answer.response for view in answer.data)
    assert answer.message.layout == mpb.REPLY_INFER_RESPONSE
    parsed = pb.ModelInferResponse.FromString(answer.response)
    assert parsed == expected_response(outputs, version=3, request_id="req-1")
    framed_reply, framed_data = reply_of(outputs)
    old = unframe(wire(frame(framed_reply, framed_data)), mpb.InferReply)
    assert parsed == pb.ModelInferResponse.FromString(encode_infer_response(old.message, old.data, "m", "req-1"))
    # the reply's outputs as views of the response: ensembles, shared memory, shadows read them
    assert [bytes(view) for view in answer.data] == [raw_of(d, a) for _, d, a in outputs]


def test_a_subset_of_outputs_is_laid_out_in_the_models_order(tmp_path: Path) -> None:
    """Requested outputs (a subset, asked in another order) through the worker's own
    ``split`` and ``serialize_reply``: the response holds those, in the model's order."""
    spec = [TensorInfo(name, "FP32", (-1, 3)) for name in ("a", "b", "c")]
    model = ModelInfo("m", 2, tmp_path, (TensorInfo("x", "FP32", (-1, 3)),), tuple(spec), 8, 0, (), 0)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    envelope = mpb.QueuedRequest(
        id="j",
        reply_to="r",
        inputs=[mpb.Tensor(name="x", datatype="FP32", shape=[2, 3], data_bytes=x.nbytes)],
        outputs=["c", "a"],
        items=2,
        reply_layout=mpb.REPLY_INFER_RESPONSE,
        response_head=response_head("m", "req-9"),
    )
    jobs = decode(
        ClaimedBatch(token=1, now_ms=0, jobs=[("j", wire(frame(envelope, [x.data.cast("B")])))], expired=[]), model
    )
    served = SimpleNamespace(model=SimpleNamespace(info=model))
    ((job, reply),) = split(served, jobs, [x, x * 2, x * 3], 1, 0, "w")  # type: ignore[arg-type]
    answer = unframe(read_headed(wire(serialize_reply(job, reply))), mpb.InferReply)
    assert answer.response is not None
    parsed = pb.ModelInferResponse.FromString(answer.response)
    assert parsed == expected_response([("a", "FP32", x), ("c", "FP32", x * 3)], version=2, request_id="req-9")


def test_parameters_in_the_head_are_the_responses_parameters() -> None:
    parameters = {
        "cached": pb.InferParameter(bool_param=True),
        "note": pb.InferParameter(string_param="laid out"),
        "n": pb.InferParameter(int64_param=-7),
    }
    outputs = [("y", "INT64", sample("INT64"))]
    reply, data = reply_of(outputs)
    head = response_head("m", "", parameters)
    answer = unframe(read_headed(wire(lay_out(reply, data, laid_out_request(head=head)))), mpb.InferReply)
    assert answer.response is not None
    assert pb.ModelInferResponse.FromString(answer.response) == expected_response(
        outputs, version=3, parameters=parameters
    )


@pytest.mark.parametrize("datatype", ["FP32", "BYTES"])
def test_a_streams_response_is_laid_out_inside_its_framing(datatype: str) -> None:
    outputs = [("y", datatype, sample(datatype, rows=50))]
    reply, data = reply_of(outputs)
    payload = wire(lay_out(reply, data, laid_out_request(mpb.REPLY_STREAM_RESPONSE)))
    answer = unframe(read_headed(payload), mpb.InferReply)
    assert answer.response is not None
    assert answer.message.layout == mpb.REPLY_STREAM_RESPONSE
    streamed = pb.ModelStreamInferResponse.FromString(answer.response)
    assert streamed == pb.ModelStreamInferResponse(
        infer_response=expected_response(outputs, version=3, request_id="req-1")
    )
    assert [bytes(view) for view in answer.data] == [raw_of(datatype, outputs[0][2])]


def test_an_empty_id_and_no_outputs_lay_out_too() -> None:
    reply, data = reply_of([])
    answer = unframe(wire(lay_out(reply, data, laid_out_request(head=response_head("m", "")))), mpb.InferReply)
    assert answer.response is not None
    assert answer.data == []
    assert pb.ModelInferResponse.FromString(answer.response) == pb.ModelInferResponse(model_name="m", model_version="3")


def test_older_formats_still_read_and_a_worker_answers_framed_unless_asked() -> None:
    """A framed reply (0x00) and a plain one read as before, with no response; a worker
    lays out only a request that asks, with a layout it knows, and only a success."""
    outputs = [("y", "FP32", sample("FP32"))]
    reply, data = reply_of(outputs)
    framed = unframe(wire(frame(reply, data)), mpb.InferReply)
    assert framed.response is None
    assert framed.framed
    assert [bytes(v) for v in framed.data] == [raw_of("FP32", outputs[0][2])]
    plain_reply = mpb.InferReply(
        id="job-1", version=3, outputs=[mpb.Tensor(name="y", datatype="FP32", shape=[1], data=b"abcd")]
    )
    plain = unframe(plain_reply.SerializeToString(), mpb.InferReply)
    assert plain.response is None
    assert not plain.framed
    assert plain.message == plain_reply

    def job(layout: int) -> model_workers.batches.Job:
        request = mpb.QueuedRequest(id="j", reply_layout=layout, response_head=response_head("m", ""))  # type: ignore[arg-type]
        return model_workers.batches.Job("j", 1, request, 1, framed=True, reply_data=list(data))

    assert wire(serialize_reply(job(mpb.REPLY_FRAMED), reply))[:1] == b"\x00"
    assert wire(serialize_reply(job(7), reply))[:1] == b"\x00"  # a layout a newer gateway knows: framed
    assert wire(serialize_reply(job(mpb.REPLY_INFER_RESPONSE), reply))[:1] == bytes([HEADED_MARKER])
    failed = mpb.InferReply(id="j", code=mpb.INTERNAL, message="boom")
    assert serialize_reply(job(mpb.REPLY_INFER_RESPONSE), failed) == failed.SerializeToString()


def test_laying_out_a_large_reply_copies_none_of_its_outputs() -> None:
    """16 MiB of outputs: the worker's laid-out reply is buffers (Chunks), the outputs'
    own among them, with a few hundred bytes of framing beside them."""
    output = np.ones((1, 4 * MIB), dtype=np.float32)
    reply, data = reply_of([("y", "FP32", output)])
    tracemalloc.start()
    try:
        payload = lay_out(reply, data, laid_out_request())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(payload, Chunks)
    assert payload.nbytes > output.nbytes
    assert peak <= 64 * 1024, f"laying out held {peak / MIB:.1f} MiB"
    assert any(np.shares_memory(np.frombuffer(b, np.uint8), output) for b in payload.buffers)


def test_a_cut_laid_out_reply_is_refused() -> None:
    reply, data = reply_of([("y", "FP32", sample("FP32"))])
    payload = wire(lay_out(reply, data, laid_out_request()))
    with pytest.raises(ValueError, match="raw contents of output 'y'"):
        unframe(payload[:-1], mpb.InferReply)
    with pytest.raises(ValueError, match="cut short inside its head"):
        unframe(payload[:10], mpb.InferReply)


# ------------------------------------------------------------ the headed reader


def headed(head: bytes, body: bytes) -> bytes:
    return HEAD_PREFIX.pack(HEADED_MARKER, len(head)) + head + body


BODY = bytes(random.Random(3).getrandbits(8) for _ in range(700))  # holds CR LF and '$' bytes
CASES: list[tuple[bytes, Any]] = [
    (headed(b"head\r\n$3", BODY), HeadedBulk(b"head\r\n$3", BODY)),
    (headed(b"", BODY), HeadedBulk(b"", BODY)),
    (headed(BODY[:200], b"z"), HeadedBulk(BODY[:200], b"z")),  # a body of one byte
    (headed(BODY[:200], b""), HeadedBulk(BODY[:200], b"")),
    (HEAD_PREFIX.pack(HEADED_MARKER, 10_000) + BODY, None),  # a head longer than the bulk: read whole
    (b"\x00" + BODY, None),  # not headed (a framed reply): read whole
    (BODY[: LARGE - 1], None),  # under the threshold: bytes, as hiredis reads it
]


@pytest.mark.parametrize("cuts", [[1], [2], [3], [7], [64], [65], [4096], [5, 1, 300, 2, 64]])
def test_headed_bulks_are_read_as_head_and_bytes_body_however_the_stream_is_cut(cuts: list[int]) -> None:
    values = [value for value, _ in CASES]
    stream = b"+OK\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(v), v) for v in values)
    stream += b"*2\r\n$1\r\nr\r\n*%d\r\n" % len(values) + b"".join(b"$%d\r\n%s\r\n" % (len(v), v) for v in values)
    stream += b":5\r\n"
    replies = receive(RespReader(LARGE, headed=True), stream, cuts)
    assert replies[0] == b"OK"
    assert replies[-1] == 5
    top, nested = replies[1 : 1 + len(values)], replies[1 + len(values)][1]
    for got in (top, nested):
        for value, (sent, want) in zip(got, CASES, strict=True):
            if want is None:
                assert not isinstance(value, HeadedBulk)
                assert bytes(value) == sent
            else:
                assert value == want
                assert type(value.body) is bytes


def test_a_reader_that_is_not_headed_reads_a_headed_bulk_whole() -> None:
    value = headed(b"head", BODY)
    (reply,) = receive(RespReader(LARGE), b"$%d\r\n%s\r\n" % (len(value), value), [100])
    assert isinstance(reply, memoryview)
    assert bytes(reply) == value


def test_empty_bytes_gives_a_bytes_object_written_through_its_view() -> None:
    value, view = empty_bytes(5)
    view[:] = b"hello"
    assert type(value) is bytes
    assert value == b"hello"
    assert hash(value) == hash(b"hello")
    with pytest.raises(ValueError, match="at least 2 bytes"):
        empty_bytes(1)


async def test_a_large_laid_out_reply_comes_through_redis_into_one_bytes_object(redis: Redis, redis_url: str) -> None:
    """3 MiB through a real Redis list and a headed link: the response is the bytes
    object the body was received into; the gateway holds about one payload for it."""
    outputs = [("y", "FP32", np.arange(3 * MIB // 4, dtype=np.float32).reshape(1, -1))]
    reply, data = reply_of(outputs)
    payload = lay_out(reply, data, laid_out_request())
    assert isinstance(payload, Chunks)
    worker_link, gateway_link = RedisLink(redis_url), RedisLink(redis_url, headed=True)
    try:
        await worker_link.execute("RPUSH", "replies", payload)
        await gateway_link.execute("PING")  # connected (its receive buffer made) before the measure
        tracemalloc.start()
        try:
            popped = await gateway_link.execute("LMPOP", 1, "replies", "LEFT", "COUNT", 10)
            answer = unframe(popped[1][0], mpb.InferReply)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        await worker_link.aclose()
        await gateway_link.aclose()
    assert isinstance(popped[1][0], HeadedBulk)
    assert answer.response is popped[1][0].body
    assert pb.ModelInferResponse.FromString(answer.response) == expected_response(
        outputs, version=3, request_id="req-1"
    )
    assert peak <= 3 * MIB + 512 * 1024, f"reading held {peak / MIB:.1f} MiB"


# ------------------------------------------------------------ through the mesh


def image(side: int) -> np.ndarray[Any, Any]:
    return np.arange(side * side, dtype=np.float32).reshape(1, 1, side, side)


@pytest.mark.parametrize("worker", ["laying out", "older, framed"])
async def test_the_mesh_answers_the_same_from_a_laid_out_reply_and_a_framed_one(
    redis: Redis, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, worker: str
) -> None:
    """ModelInfer and ModelStreamInfer, small and over the reader's threshold, with a
    request id: the same responses whether the worker lays its reply out (the gateway
    then encodes nothing) or answers framed as an older worker does (the gateway
    encodes, as before)."""
    encoded: list[int] = []
    encode = gateway.servicer.encode_infer_response
    encode_stream = gateway.servicer.encode_stream_response

    def counted_encode(*args: Any) -> bytes:
        encoded.append(1)
        return encode(*args)

    def counted_stream(*args: Any) -> bytes:
        encoded.append(1)
        return encode_stream(*args)

    monkeypatch.setattr(gateway.servicer, "encode_infer_response", counted_encode)
    monkeypatch.setattr(gateway.servicer, "encode_stream_response", counted_stream)
    if worker == "older, framed":
        monkeypatch.setattr(model_workers.batches, "laid_out", lambda request: False)
    mesh = await start_mesh(redis_url, write_example_repository(tmp_path, ["scale_any"]))
    sides = [8, 512]  # 256 B and 1 MiB
    try:
        async with grpc.aio.insecure_channel(mesh.address, options=[("grpc.max_receive_message_length", -1)]) as ch:
            stub = infer_stub(ch)
            unary = [
                await stub.ModelInfer(
                    infer_request("scale_any", {"image": image(side)}, request_id=f"u{side}"), timeout=RPC_TIMEOUT_S
                )
                for side in sides
            ]
            requests = [infer_request("scale_any", {"image": image(side)}, request_id=f"s{side}") for side in sides]
            streamed = [r async for r in stub.ModelStreamInfer(iter(requests), timeout=RPC_TIMEOUT_S)]
    finally:
        await stop_mesh(mesh)
    for side, response in zip(sides, unary, strict=True):
        assert response.id == f"u{side}"
        assert response.model_name == "scale_any"
        assert response.model_version == "1"
        assert np.array_equal(output_arrays(response)["scaled"], image(side) * 2 + 1)
    for side, message in zip(sides, streamed, strict=True):
        assert message.error_message == ""
        assert message.infer_response.id == f"s{side}"
        assert np.array_equal(output_arrays(message.infer_response)["scaled"], image(side) * 2 + 1)
    assert len(encoded) == (0 if worker == "laying out" else 4)
    assert await queue_leftovers(redis) == []


def test_stream_response_joins_its_parts_in_one_copy() -> None:
    inner = expected_response([("y", "FP32", sample("FP32"))], version=1, request_id="x").SerializeToString()
    assert stream_response(inner[:5], inner[5:]) == stream_response(inner)
    assert pb.ModelStreamInferResponse.FromString(stream_response(inner)).infer_response.id == "x"
