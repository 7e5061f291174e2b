"""Dynamic batching, read from the worker's own counters.

Requests are queued while the worker's serve loop is held, then released, so
what one claim can see is fixed before the worker looks: batch composition is
deterministic. Results are compared with the same model file run in-process by
ONNX Runtime.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from redis.asyncio import Redis

from meshserve.devkit.examples import write_example_repository
from model_workers.served import INLINE_COMPUTE_MS
from model_workers.worker import ModelStats
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from tests.slow_model import NAME as SLOW
from tests.slow_model import iterations_for, slow_request_inputs, write_slow
from tests.support import (
    Mesh,
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

RPC_TIMEOUT_S = 10


def stats(mesh: Mesh, model: str) -> ModelStats:
    return mesh.workers[0].worker.served[(model, 1)].stats


def repository_with_config(root: Path, model: str, config: str) -> Path:
    write_example_repository(root, [model])
    (root / model / "config.yaml").write_text(config)
    return root


async def infer_all(
    stub: pb_grpc.GRPCInferenceServiceStub, requests: list[pb.ModelInferRequest]
) -> list[pb.ModelInferResponse]:
    return list(await asyncio.gather(*(stub.ModelInfer(r, timeout=RPC_TIMEOUT_S) for r in requests)))


async def infer_queued_together(
    mesh: Mesh, stub: pb_grpc.GRPCInferenceServiceStub, redis: Redis, requests: list[pb.ModelInferRequest]
) -> list[pb.ModelInferResponse]:
    """Send ``requests`` while the worker is held; release it once all are queued."""
    worker = mesh.workers[0]
    await hold_serving(worker)
    calls = asyncio.gather(*(stub.ModelInfer(r, timeout=RPC_TIMEOUT_S) for r in requests))
    try:
        await wait_queued(redis, requests[0].model_name, len(requests))
    finally:
        release_serving(worker)
    return list(await calls)


async def test_queued_requests_share_one_onnx_run(
    mesh: Mesh, stub: pb_grpc.GRPCInferenceServiceStub, redis: Redis, model_repository: Path
) -> None:
    rng = np.random.default_rng(11)
    sizes = [i % 3 + 1 for i in range(16)]  # 31 items in all: one batch of the default max 32
    inputs = [rng.standard_normal((size, 64)).astype(np.float32) for size in sizes]

    responses = await infer_queued_together(mesh, stub, redis, [infer_request("mlp", {"features": x}) for x in inputs])

    counters = stats(mesh, "mlp")
    assert (counters.batches, counters.requests, counters.items, counters.largest_batch) == (1, 16, 31, 31)
    session = ort.InferenceSession(
        str(model_repository / "mlp" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    for x, response in zip(inputs, responses, strict=True):
        logits, probabilities = session.run(["logits", "probabilities"], {"features": x})
        got = output_arrays(response)
        assert got["logits"].shape == (x.shape[0], 10)
        assert np.allclose(got["logits"], logits, rtol=1e-5, atol=1e-5)
        assert np.allclose(got["probabilities"], probabilities, rtol=1e-5, atol=1e-6)
    assert await queue_leftovers(redis) == []


async def test_a_batch_never_exceeds_max_batch_size_in_items(
    mesh: Mesh, stub: pb_grpc.GRPCInferenceServiceStub, redis: Redis
) -> None:
    """16 requests of 4 items each must not become one ONNX Runtime run of 64 (max 32):
    the claim counts items, not jobs (a model built for at most 32 items, e.g. a
    TensorRT profile, would fail on 64)."""
    inputs = [np.full((4, 64), i, dtype=np.float32) for i in range(16)]  # 64 items, max_batch_size 32

    responses = await infer_queued_together(mesh, stub, redis, [infer_request("mlp", {"features": x}) for x in inputs])

    assert all(output_arrays(r)["logits"].shape == (4, 10) for r in responses)
    counters = stats(mesh, "mlp")
    assert counters.items == 64
    assert counters.largest_batch <= 32
    assert counters.batches >= 2


async def test_different_shapes_are_never_stacked(
    mesh: Mesh, stub: pb_grpc.GRPCInferenceServiceStub, redis: Redis
) -> None:
    rng = np.random.default_rng(5)
    shapes = [(1, 1, 4, 4), (1, 1, 3, 5)] * 3 + [(2, 1, 4, 4)]
    images = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]

    responses = await infer_queued_together(
        mesh, stub, redis, [infer_request("scale_any", {"image": image}) for image in images]
    )

    for image, response in zip(images, responses, strict=True):
        scaled = output_arrays(response)["scaled"]
        assert scaled.shape == image.shape
        np.testing.assert_allclose(scaled, image * 2 + 1, rtol=1e-6)
    counters = stats(mesh, "scale_any")
    # one batch per shape signature (dims after the batch dim): [1,4,4] x 4 items, [1,3,5] x 3
    assert (counters.batches, counters.requests, counters.items, counters.largest_batch) == (2, 7, 8, 5)
    assert await queue_leftovers(redis) == []


async def test_filling_a_batch_blocks_instead_of_spinning_while_another_shape_waits(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    """Workers never busy-poll (DESIGN, STYLE habit 7), also while topping up a batch.

    While a partial batch fills, a queued job of another shape keeps the ready set
    non-empty, so every CLAIM pushes the wake token back: a fill that re-claims on
    every token spins (about a thousand claims in a 0.5 s window before the fix).
    """
    repository = repository_with_config(tmp_path, "scale_any", "dynamic_batching:\n  max_queue_delay_ms: 500\n")
    mesh = await start_mesh(redis_url, repository)
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            small = [infer_request("scale_any", {"image": np.ones((1, 1, 2, 2), np.float32)}) for _ in range(2)]
            other = infer_request("scale_any", {"image": np.ones((1, 1, 3, 3), np.float32)})
            worker = mesh.workers[0]
            await hold_serving(worker)
            try:
                calls = [asyncio.ensure_future(stub.ModelInfer(r, timeout=RPC_TIMEOUT_S)) for r in small]
                await wait_queued(redis, "scale_any", 2)
                calls.append(asyncio.ensure_future(stub.ModelInfer(other, timeout=RPC_TIMEOUT_S)))
                await wait_queued(redis, "scale_any", 3)
                await redis.config_resetstat()
            finally:
                release_serving(worker)
            await asyncio.gather(*calls)
            claims = (await redis.info("commandstats"))["cmdstat_evalsha"]["calls"]
        counters = stats(mesh, "scale_any")
    finally:
        await stop_mesh(mesh)

    assert (counters.batches, counters.items) == (2, 3)
    assert claims <= 20  # a few claims per batch, not one per wake-list round trip


async def test_lone_request_on_an_idle_worker_does_not_wait_for_a_batch(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    # A queue delay far longer than the call's deadline: waiting to fill a batch would time out.
    repository = repository_with_config(tmp_path, "mlp", "dynamic_batching:\n  max_queue_delay_ms: 30000\n")
    mesh = await start_mesh(redis_url, repository)
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            x = np.ones((3, 64), dtype=np.float32)
            response = await infer_stub(channel).ModelInfer(infer_request("mlp", {"features": x}), timeout=5)
        counters = stats(mesh, "mlp")
    finally:
        await stop_mesh(mesh)

    assert output_arrays(response)["logits"].shape == (3, 10)
    assert (counters.batches, counters.items) == (1, 3)


async def test_partial_batch_takes_requests_that_arrive_within_the_queue_delay(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    repository = repository_with_config(tmp_path, "mlp", "dynamic_batching:\n  max_queue_delay_ms: 1500\n")
    mesh = await start_mesh(redis_url, repository)
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            x = np.ones((1, 64), dtype=np.float32)
            worker = mesh.workers[0]
            await hold_serving(worker)
            first_two = asyncio.gather(
                *(stub.ModelInfer(infer_request("mlp", {"features": x}), timeout=10) for _ in "ab")
            )
            await wait_queued(redis, "mlp", 2)
            release_serving(worker)
            # the worker holds a partial batch of 2 until 1.5 s after the oldest arrived
            late = await stub.ModelInfer(infer_request("mlp", {"features": x * 2}), timeout=10)
            await first_two
        counters = stats(mesh, "mlp")
    finally:
        await stop_mesh(mesh)

    assert output_arrays(late)["logits"].shape == (1, 10)
    assert (counters.batches, counters.requests, counters.items, counters.largest_batch) == (1, 3, 3, 3)


async def test_a_wake_up_and_its_claim_are_one_round_trip(redis: Redis, redis_url: str, tmp_path: Path) -> None:
    """The claim travels behind the worker's blocking pop: answering a lone request
    takes no separate claim, only when the worker guessed the model (its only one)."""
    mesh = await start_mesh(redis_url, write_example_repository(tmp_path, ["mlp"]))
    try:
        worker = mesh.workers[0].worker
        runner = worker.runner
        separate_claims = 0
        plain_claim = runner.claim

        async def counted_claim(*args: object, **kwargs: object) -> object:
            nonlocal separate_claims
            separate_claims += 1
            return await plain_claim(*args, **kwargs)  # type: ignore[arg-type]

        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            for value in range(7):
                if value == 2:  # past the start-up's own wake-ups (the model's assignment)
                    runner.claim = counted_claim  # type: ignore[method-assign]
                await worker.idle.wait()  # blocked in its pop: the next request wakes it
                features = np.full((1, 64), value, np.float32)
                response = await stub.ModelInfer(infer_request("mlp", {"features": features}), timeout=RPC_TIMEOUT_S)
                assert output_arrays(response)["probabilities"].shape == (1, 10)
        assert separate_claims == 0
        assert stats(mesh, "mlp").requests == 7
    finally:
        await stop_mesh(mesh)


async def test_a_quick_model_runs_on_the_event_loop_thread_a_slow_one_beside_it(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    """Handing a batch to the ONNX Runtime thread and back costs more than a quick
    model's whole run; a slow model keeps the thread so the loop can extend its
    leases meanwhile. The first batch, before any is timed, takes the thread."""
    mesh = await start_mesh(redis_url, write_example_repository(tmp_path, ["mlp"]))
    loop_thread = threading.get_ident()
    threads: list[str] = []
    served = mesh.workers[0].worker.served[("mlp", 1)]
    run = served.model.run

    def recorded(feed: dict[str, Any], options: Any = None) -> Any:
        threads.append("loop" if threading.get_ident() == loop_thread else threading.current_thread().name)
        return run(feed, options)

    served.model.run = recorded  # type: ignore[method-assign]
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            request = infer_request("mlp", {"features": np.ones((1, 64), np.float32)})
            await stub.ModelInfer(request, timeout=RPC_TIMEOUT_S)
            # the first batch's time is the estimate, not a fifth of it
            assert served.compute_ms_avg == pytest.approx(served.stats.device_seconds * 1000)
            served.compute_ms_avg = served.last_compute_ms = INLINE_COMPUTE_MS / 2  # a quick model
            await stub.ModelInfer(request, timeout=RPC_TIMEOUT_S)
            served.compute_ms_avg = INLINE_COMPUTE_MS * 2  # a slow one
            await stub.ModelInfer(request, timeout=RPC_TIMEOUT_S)
    finally:
        await stop_mesh(mesh)

    assert [t if t == "loop" else t.split("_")[0] for t in threads] == ["ort", "loop", "ort"]


async def test_a_quick_model_that_turns_slow_holds_the_event_loop_for_the_inline_limit_only(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    """Issue 16, seen 4: a model that used to be quick (so it ran on the event loop's
    thread) turned slow and froze the worker. The inline run is stopped after
    ``INLINE_LIMIT_MS`` and the batch runs again on an ONNX Runtime thread, answered
    right; the loop and the serve loop stay free meanwhile (another model answers), and
    the model no longer runs inline."""
    repository = write_example_repository(write_slow(tmp_path), ["mlp"])
    iterations = iterations_for(1.5, repository)
    mesh = await start_mesh(redis_url, repository, worker_overrides={"intra_op_threads": 1})
    loop_thread = threading.get_ident()
    threads: list[str] = []
    served = mesh.workers[0].worker.served[(SLOW, 1)]
    run = served.model.run

    def recorded(feed: dict[str, Any], options: Any = None) -> Any:
        threads.append("loop" if threading.get_ident() == loop_thread else "ort")
        return run(feed, options)

    served.model.run = recorded  # type: ignore[method-assign]
    ticks = 0

    async def tick() -> None:  # counts while the loop is free
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    try:
        served.compute_ms_avg = served.last_compute_ms = INLINE_COMPUTE_MS / 2  # it was quick
        ticking = asyncio.create_task(tick())
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            request = infer_request(SLOW, slow_request_inputs(iterations))
            slow_call = asyncio.ensure_future(stub.ModelInfer(request, timeout=RPC_TIMEOUT_S))
            async with asyncio.timeout(10):  # until it runs again on a thread
                while threads != ["loop", "ort"]:  # noqa: ASYNC110 (bounded poll: no event for it)
                    await asyncio.sleep(0.005)
            # the serve loop is free too: another model on the worker answers meanwhile
            fast_request = infer_request("mlp", {"features": np.ones((1, 64), np.float32)})
            fast = await stub.ModelInfer(fast_request, timeout=2)
            still_computing = not slow_call.done()
            response = await slow_call
        ticking.cancel()
    finally:
        await stop_mesh(mesh)

    assert output_arrays(response)["done"].tolist() == [[float(iterations)]]
    assert threads == ["loop", "ort"]  # stopped on the loop, run again off it
    assert not served.runs_inline()  # its time now says slow
    assert ticks > 10  # the loop turned while the 1.5 s batch ran (frozen, it would not have)
    assert output_arrays(fast)["logits"].shape == (1, 10)
    assert still_computing
