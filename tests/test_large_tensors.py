"""Large tensors: what one request costs each process, the size limit, and the loop.

A tensor's bytes travel beside the envelope (meshserve/wire/envelope.py): the
gateway frames the buffers it received, the worker views them, the worker's
outputs go back as views, and the gateway copies them once into its response.
Memory is measured with tracemalloc (bytes allocated, not time); the loop test
records which thread did payload-sized work.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from redis.asyncio import Redis

import gateway.core
import gateway.servicer
import model_workers.runner
from meshserve.devkit.examples import write_example_repository
from meshserve.models.repository import ModelInfo, scan_repository
from meshserve.platform.heap import HUGE_PAGES_TUNABLE, return_large_buffers, with_huge_pages
from meshserve.queue import ClaimedBatch, Enqueued, ModelKeys, QueueProtocol
from meshserve.queue.protocol import LUA_PAYLOAD_BYTES
from meshserve.store.link import Chunks, RedisLink
from meshserve.wire.codec import encode_infer_response, pack_inputs
from meshserve.wire.envelope import OFF_LOOP_BYTES, frame, unframe
from meshserve.wire.rawfields import IN_PLACE_BYTES, parse_infer_request
from model_workers.batches import decode, serialize_reply, split, stack
from model_workers.served import INLINE_COMPUTE_MS
from protos import grpc_service_pb2 as pb
from protos import meshserve_pb2 as mpb
from tests.support import infer_request, infer_stub, output_arrays, queue_leftovers, start_mesh, stop_mesh

MIB = 1 << 20
SLACK_BYTES = 256 * 1024
"""What a stage may allocate besides its payload-sized buffers: headers, small objects."""
RPC_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def scale_any(tmp_path_factory: pytest.TempPathFactory) -> ModelInfo:
    repository = write_example_repository(tmp_path_factory.mktemp("large"), ["scale_any"])
    (model,) = scan_repository(repository)[0]
    return model


def image(side: int) -> np.ndarray[Any, Any]:
    """An FP32 [1, 1, side, side] image for scale_any: 4 * side**2 bytes."""
    return np.arange(side * side, dtype=np.float32).reshape(1, 1, side, side)


@pytest.fixture
def traced() -> Iterator[Callable[[Callable[[], Any]], tuple[Any, int]]]:
    """Run a stage under tracemalloc: its result and the most bytes it held at once."""

    def measure(stage: Callable[[], Any]) -> tuple[Any, int]:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        result = stage()
        _, peak = tracemalloc.get_traced_memory()
        return result, peak - before

    tracemalloc.start()
    try:
        yield measure
    finally:
        tracemalloc.stop()


def wire(payload: bytes | Chunks) -> bytes:
    """What Redis hands the next process: the payload as one bytes object."""
    return payload if isinstance(payload, bytes) else b"".join(bytes(b) for b in payload.buffers)


def served(model: ModelInfo) -> Any:
    """What ``split`` reads of a served model: its ModelInfo."""
    return SimpleNamespace(model=SimpleNamespace(info=model))


def test_a_round_trip_costs_the_gateway_one_copy_of_the_payload_and_the_worker_none(
    scale_any: ModelInfo, traced: Callable[[Callable[[], Any]], tuple[Any, int]]
) -> None:
    """16 MiB: the gateway reads the request's bytes in place in what gRPC received and
    copies the outputs once into the response; the worker copies nothing. Before
    framing, each side serialized the tensors into protobuf and hiredis packed them
    again: 32 MiB traced at the gateway's enqueue, 48 at the worker, 16 for the response."""
    received_bytes = infer_request("scale_any", {"image": image(2048)}).SerializeToString()  # what gRPC hands over
    payload = 16 * MIB

    def gateway_enqueue() -> bytes | Chunks:
        received = parse_infer_request(received_bytes)
        packed = pack_inputs(received.message, scale_any, received.raw)
        envelope = mpb.QueuedRequest(id="j", reply_to="r", inputs=packed.tensors, items=1)
        return frame(envelope, packed.data)

    queued, gateway_in = traced(gateway_enqueue)
    claimed = ClaimedBatch(token=1, now_ms=0, jobs=[("j", wire(queued))], expired=[])

    def worker_batch() -> bytes | Chunks:
        jobs = decode(claimed, scale_any)
        feed = stack(jobs)
        outputs = [feed["image"]]  # what the model would return: its own allocation, not ours
        ((job, reply),) = split(served(scale_any), jobs, outputs, 1, 0, "w")
        return serialize_reply(job, reply)

    replied, worker = traced(worker_batch)
    reply_blob = wire(replied)

    def gateway_respond() -> bytes:
        answer = unframe(reply_blob, mpb.InferReply)
        return encode_infer_response(answer.message, answer.data, "scale_any", "id")

    response, gateway_out = traced(gateway_respond)

    assert gateway_in <= SLACK_BYTES, f"gateway enqueue held {gateway_in / MIB:.1f} MiB"
    assert worker <= SLACK_BYTES, f"worker held {worker / MIB:.1f} MiB"
    assert gateway_out <= payload + SLACK_BYTES, f"gateway response held {gateway_out / MIB:.1f} MiB"
    answered = output_arrays(pb.ModelInferResponse.FromString(response))["scaled"]
    assert np.array_equal(answered, image(2048))


def test_a_plain_envelope_from_an_older_gateway_gets_a_plain_reply(scale_any: ModelInfo) -> None:
    """A mesh being upgraded: an envelope with its tensors inside is read as before,
    and answered with the outputs inside the reply, which an older gateway reads."""
    array = image(4)
    tensor = mpb.Tensor(name="image", datatype="FP32", shape=array.shape, data=array.tobytes())
    plain = mpb.QueuedRequest(id="j", reply_to="r", inputs=[tensor], items=1).SerializeToString()
    jobs = decode(ClaimedBatch(token=1, now_ms=0, jobs=[("j", plain)], expired=[]), scale_any)
    feed = stack(jobs)
    ((job, reply),) = split(served(scale_any), jobs, [feed["image"] * 2], 1, 0, "w")
    blob = serialize_reply(job, reply)
    assert isinstance(blob, bytes)
    older = mpb.InferReply.FromString(blob)
    assert np.array_equal(np.frombuffer(older.outputs[0].data, np.float32).reshape(array.shape), array * 2)


def test_a_framed_payload_cut_short_is_refused() -> None:
    tensor = mpb.Tensor(name="x", datatype="FP32", shape=[4], data_bytes=16)
    payload = wire(frame(mpb.QueuedRequest(id="j", inputs=[tensor]), [b"\0" * 16]))
    with pytest.raises(ValueError, match="cut short inside tensor 'x'"):
        unframe(payload[:-1], mpb.QueuedRequest)


async def test_a_request_over_max_message_bytes_is_refused_naming_the_flag(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    """Over the limit (but under twice it, where gRPC's own refusal takes over): the
    gateway answers RESOURCE_EXHAUSTED with the size, the limit and the flag, counts
    it, and queues nothing; a request under the limit is served."""
    repository = write_example_repository(tmp_path, ["scale_any"])
    limit = 64 * 1024
    mesh = await start_mesh(redis_url, repository, max_message_bytes=limit)
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            small = await stub.ModelInfer(infer_request("scale_any", {"image": image(64)}), timeout=RPC_TIMEOUT_S)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ModelInfer(infer_request("scale_any", {"image": image(160)}), timeout=RPC_TIMEOUT_S)
        counted = mesh.gateway.metrics.registry.get_sample_value(
            "meshserve_rejections_total", {"tenant": "dev", "reason": "message_size"}
        )
    finally:
        await stop_mesh(mesh)
    assert output_arrays(small)["scaled"].shape == (1, 1, 64, 64)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = caught.value.details() or ""
    assert f"limit of {limit} bytes" in details, details
    assert "--max-message-bytes" in details, details
    assert counted == 1
    assert await queue_leftovers(redis) == []


async def test_payload_sized_work_runs_off_the_event_loop_and_small_requests_stay_inline(
    redis: Redis, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decoding at the gateway, stacking and splitting at the worker: for a request
    over OFF_LOOP_BYTES each runs on another thread than the event loop's (which keeps
    serving reports, leases and other calls meanwhile), for a small one on the loop's
    own thread (a hop would cost more than the work). The gateway encodes no response:
    the worker lays it out (meshserve/wire/envelope.py) and the reply is received into
    the bytes gRPC sends."""
    threads: dict[str, list[int]] = {}

    def recorded(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            threads.setdefault(name, []).append(threading.get_ident())
            return function(*args, **kwargs)

        return run

    monkeypatch.setattr(gateway.core, "pack_inputs", recorded("pack", gateway.core.pack_inputs))
    monkeypatch.setattr(model_workers.runner, "stack", recorded("stack", model_workers.runner.stack))
    monkeypatch.setattr(model_workers.runner, "split", recorded("split", model_workers.runner.split))
    encode = recorded("encode", gateway.servicer.encode_infer_response)
    monkeypatch.setattr(gateway.servicer, "encode_infer_response", encode)
    repository = write_example_repository(tmp_path, ["scale_any"])
    mesh = await start_mesh(redis_url, repository)
    loop_thread = threading.get_ident()
    large_side = 1024  # 4 MiB
    assert 4 * large_side**2 > OFF_LOOP_BYTES
    try:
        async with grpc.aio.insecure_channel(mesh.address, options=[("grpc.max_receive_message_length", -1)]) as ch:
            stub = infer_stub(ch)
            small = await stub.ModelInfer(infer_request("scale_any", {"image": image(8)}), timeout=RPC_TIMEOUT_S)
            small_threads = {name: list(idents) for name, idents in threads.items()}
            threads.clear()
            large = await stub.ModelInfer(
                infer_request("scale_any", {"image": image(large_side)}), timeout=RPC_TIMEOUT_S
            )
    finally:
        await stop_mesh(mesh)
    assert np.array_equal(output_arrays(small)["scaled"], image(8) * 2 + 1)
    assert np.array_equal(output_arrays(large)["scaled"], image(large_side) * 2 + 1)
    stages = ["pack", "stack", "split"]
    assert sorted(small_threads) == sorted(threads) == sorted(stages)  # no "encode": laid out by the worker
    assert {name: set(small_threads[name]) for name in stages} == {name: {loop_thread} for name in stages}
    on_loop = [name for name in stages if loop_thread in threads[name]]
    assert on_loop == [], f"ran on the event loop's thread for a large request: {on_loop}"
    assert await queue_leftovers(redis) == []


async def test_a_quick_models_large_batch_runs_off_the_event_loop(redis: Redis, redis_url: str, tmp_path: Path) -> None:
    """A model quick enough to run on the event loop's thread (``Served.runs_inline``)
    still runs a batch over OFF_LOOP_BYTES on an ONNX Runtime thread: its run takes
    time that grows with the payload, which every other call would wait behind."""
    mesh = await start_mesh(redis_url, write_example_repository(tmp_path, ["scale_any"]))
    loop_thread = threading.get_ident()
    threads: list[str] = []
    served = mesh.workers[0].worker.served[("scale_any", 1)]
    run = served.model.run

    def recorded(feed: dict[str, Any], options: Any = None) -> Any:
        threads.append("loop" if threading.get_ident() == loop_thread else "ort")
        return run(feed, options)

    served.model.run = recorded  # type: ignore[method-assign]
    large_side = 1024  # 4 MiB
    assert 4 * large_side**2 > OFF_LOOP_BYTES
    try:
        async with grpc.aio.insecure_channel(mesh.address, options=[("grpc.max_receive_message_length", -1)]) as ch:
            stub = infer_stub(ch)
            served.compute_ms_avg = served.last_compute_ms = INLINE_COMPUTE_MS / 2  # a quick model
            small = await stub.ModelInfer(infer_request("scale_any", {"image": image(8)}), timeout=RPC_TIMEOUT_S)
            served.compute_ms_avg = served.last_compute_ms = INLINE_COMPUTE_MS / 2  # still quick
            assert served.runs_inline()
            large = await stub.ModelInfer(
                infer_request("scale_any", {"image": image(large_side)}), timeout=RPC_TIMEOUT_S
            )
    finally:
        await stop_mesh(mesh)
    assert np.array_equal(output_arrays(small)["scaled"], image(8) * 2 + 1)
    assert np.array_equal(output_arrays(large)["scaled"], image(large_side) * 2 + 1)
    assert threads == ["loop", "ort"]


def received_request() -> pb.ModelInferRequest:
    """Raw contents between and after other fields, parameters, typed contents, outputs;
    over IN_PLACE_BYTES."""
    request = infer_request("m", {"a": image(160), "b": np.arange(5, dtype=np.int64)}, outputs=["y"], priority=2)
    request.inputs.add(name="c", datatype="INT32", shape=[2]).contents.int_contents.extend([7, -7])
    request.id = "req"
    return request


def test_raw_contents_are_read_in_place_and_the_rest_as_protobuf_reads_it() -> None:
    serialized = received_request().SerializeToString()
    assert len(serialized) >= IN_PLACE_BYTES
    received = parse_infer_request(serialized)
    whole = pb.ModelInferRequest.FromString(serialized)
    assert received.raw is not None
    assert [bytes(view) for view in received.raw] == list(whole.raw_input_contents)
    assert all(view.obj is serialized for view in received.raw)  # views, no copy
    del whole.raw_input_contents[:]
    assert received.message == whole


def test_a_small_request_is_parsed_by_protobuf_alone() -> None:
    serialized = infer_request("m", {"a": image(3)}).SerializeToString()
    received = parse_infer_request(serialized)
    assert received.raw is None
    assert received.message == pb.ModelInferRequest.FromString(serialized)


@pytest.mark.parametrize("cut", [1, 7, 40, -3])
def test_a_cut_request_is_refused_as_protobuf_refuses_it(cut: int) -> None:
    serialized = received_request().SerializeToString()[:cut]
    with pytest.raises(DecodeError):
        pb.ModelInferRequest.FromString(serialized)
    with pytest.raises(DecodeError):
        parse_infer_request(serialized)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_services_fix_glibcs_mmap_threshold_so_freed_tensors_leave_the_process() -> None:
    assert return_large_buffers()


def _thp_mode() -> str:
    try:
        modes = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "absent"
    return modes.split("[", 1)[1].split("]", 1)[0]


HUGE_PAGES_PROBE = """
from meshserve.platform.heap import HUGE_PAGES_TUNABLE, return_large_buffers, with_huge_pages
return_large_buffers()
buffer = bytearray(16 << 20)  # a payload-sized buffer, touched: its own mapping
rollup = open("/proc/self/smaps_rollup").read()
print(next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("AnonHugePages:")))
"""


def test_the_supervisor_starts_services_with_glibcs_huge_page_tunable_kept_beside_others() -> None:
    assert with_huge_pages({})["GLIBC_TUNABLES"] == HUGE_PAGES_TUNABLE
    assert with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "b"}) == {
        "GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{HUGE_PAGES_TUNABLE}",
        "A": "b",
    }
    assert with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's tunables")
@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"), reason="the kernel gives no transparent huge pages")
def test_a_payload_sized_buffer_gets_huge_pages_under_the_tunable_and_none_without() -> None:
    """Fresh mappings fault in page by page (about 25 ms per 16 MiB on a VM): the
    tunable makes glibc ask for huge pages on them (heap.with_huge_pages)."""
    probe = [sys.executable, "-c", HUGE_PAGES_PROBE]
    plain = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    with_tunable = subprocess.run(probe, env=with_huge_pages(plain), capture_output=True, check=True, timeout=30)
    assert int(with_tunable.stdout) >= 8 * 1024  # KiB: most of the 16 MiB
    if _thp_mode() == "madvise":  # under "always" every mapping gets them anyway
        without = subprocess.run(probe, env=plain, capture_output=True, check=True, timeout=30)
        assert int(without.stdout) == 0


async def test_a_reply_over_the_workers_max_message_bytes_is_refused_not_written(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    """A model whose outputs pass the worker's limit: its caller hears RESOURCE_EXHAUSTED
    naming the model, the size and the flag; the outputs never reach Redis."""
    repository = write_example_repository(tmp_path, ["scale_any"])
    mesh = await start_mesh(redis_url, repository, worker_overrides={"max_message_bytes": 4096})
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            small = await stub.ModelInfer(infer_request("scale_any", {"image": image(16)}), timeout=RPC_TIMEOUT_S)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ModelInfer(infer_request("scale_any", {"image": image(40)}), timeout=RPC_TIMEOUT_S)
    finally:
        await stop_mesh(mesh)
    assert output_arrays(small)["scaled"].shape == (1, 1, 16, 16)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = caught.value.details() or ""
    assert "model 'scale_any' answered 6400 bytes of outputs, over the limit of 4096 bytes" in details, details
    assert "--max-message-bytes" in details
    assert await queue_leftovers(redis) == []


async def test_a_large_payload_goes_beside_the_enqueue_script_and_a_refusal_leaves_nothing(
    redis: Redis, redis_url: str
) -> None:
    """Over LUA_PAYLOAD_BYTES a payload is written with a plain HSET (Redis keeps no Lua
    copies of it) and read back with a plain HGET after the claim; a refused one
    leaves no job behind; a retried enqueue is still a duplicate."""
    link = RedisLink(redis_url)
    queue = QueueProtocol(link)
    keys = ModelKeys.for_model("big", 1)
    payload = Chunks.of([b"\x00head", np.arange(LUA_PAYLOAD_BYTES, dtype=np.uint8)])
    far_ms = int(time.time() * 1000) + 60_000
    common: dict[str, Any] = {
        "tier": 1,
        "deadline_ms": far_ms,
        "tenant": "t",
        "reply_to": "r",
        "signature": "",
    }
    try:
        assert (await queue.enqueue(keys, "a", payload=payload, max_queue_size=0, **common)).code == Enqueued.ENQUEUED
        assert (await queue.enqueue(keys, "a", payload=payload, max_queue_size=0, **common)).code == Enqueued.DUPLICATE
        refused = await queue.enqueue(keys, "a", payload=payload, max_queue_size=1, **common)
        assert refused.code == Enqueued.MODEL_QUEUE_FULL  # a retry refused: the queued job stays
        assert await redis.hexists(keys.job("a"), "d")
        assert await redis.hget(keys.job("a"), "p") == b""
        assert await redis.hstrlen(keys.job("a"), "b") == payload.nbytes
        assert (
            await queue.enqueue(keys, "b", payload=payload, max_queue_size=1, **common)
        ).code == Enqueued.MODEL_QUEUE_FULL
        assert not await redis.exists(keys.job("b"))
        claim = await queue.fetch_bulk(keys, await queue.claim(keys, max_items=1, lease_ms=5000, worker_id="w"))
    finally:
        await link.aclose()
    assert [(job_id, len(blob)) for job_id, blob in claim.jobs] == [("a", payload.nbytes)]
    assert claim.jobs[0][1] == wire(payload)
