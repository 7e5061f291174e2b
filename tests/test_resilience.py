"""What the mesh does when its parts fail: a model that fails on every input,
the router going away, Redis going away and coming back, and a worker's health
as it drains."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper, numpy_helper
from redis.asyncio import Redis

from meshserve.devkit.examples import write_example_repository
from meshserve.devkit.redis_server import RedisServer, free_port, suite_binary_from_env
from protos import grpc_service_pb2 as pb
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
    wait_view,
)

RPC_TIMEOUT_S = 10


def write_gather_model(repository: Path) -> None:
    """`lookup`: out = table[idx]; idx out of range [0, 8) makes ONNX Runtime fail.

    Warm-up draws indices in [0, 8), so the model loads and reports ready, and a
    request with idx=100 fails inside the model: a model that "crashes" on input.
    """
    table = numpy_helper.from_array(np.arange(8, dtype=np.float32) * 10, "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["value"], axis=0)],
        "lookup",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("value", TensorProto.FLOAT, ["batch"])],
        [table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    (repository / "lookup" / "1").mkdir(parents=True)
    onnx.save(model, repository / "lookup" / "1" / "model.onnx")


async def test_a_model_failing_every_batch_goes_not_ready_while_others_serve(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    repository = write_example_repository(tmp_path, ["mlp"])
    write_gather_model(repository)
    mesh = await start_mesh(redis_url, repository)
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            good = await stub.ModelInfer(infer_request("lookup", {"idx": np.array([3], np.int64)}), timeout=5)
            assert output_arrays(good)["value"].tolist() == [30.0]
            for _ in range(3):
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await stub.ModelInfer(infer_request("lookup", {"idx": np.array([100], np.int64)}), timeout=5)
                assert failed.value.code() == grpc.StatusCode.INTERNAL
                assert "model 'lookup' failed" in (failed.value.details() or "")
            await wait_view(mesh, lambda view: ("lookup", 1) not in view.ready)

            ready = await stub.ModelReady(pb.ModelReadyRequest(name="lookup"), timeout=5)
            assert ready.ready is False
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ModelInfer(infer_request("lookup", {"idx": np.array([3], np.int64)}), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "model 'lookup' version 1 is not ready" in (refused.value.details() or "")
            # the other model on the same worker keeps serving
            other = await stub.ModelInfer(infer_request("mlp", {"features": np.ones((1, 64), np.float32)}), timeout=5)
            assert output_arrays(other)["logits"].shape == (1, 10)
        async with grpc.aio.insecure_channel(mesh.workers[0].health_address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            lookup = await health.Check(health_pb2.HealthCheckRequest(service="lookup/1"), timeout=5)
            mlp = await health.Check(health_pb2.HealthCheckRequest(service="mlp/1"), timeout=5)
        assert lookup.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert mlp.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await stop_mesh(mesh)


async def test_the_data_path_keeps_serving_while_the_router_is_down(
    redis: Redis, redis_url: str, model_repository: Path
) -> None:
    mesh = await start_mesh(redis_url, model_repository)
    try:
        await mesh.router.stop(grace_s=0)
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            for _ in range(3):
                response = await stub.ModelInfer(
                    infer_request("mlp", {"features": np.ones((2, 64), np.float32)}), timeout=RPC_TIMEOUT_S
                )
                assert output_arrays(response)["logits"].shape == (2, 10)
        assert mesh.gateway.gateway.server_ready()  # the last routing table stays in force
    finally:
        await stop_mesh(mesh)


async def test_redis_outage_fails_fast_then_service_resumes_without_restarts(
    model_repository: Path,
) -> None:
    server = RedisServer(suite_binary_from_env()).start()
    port = server.port
    mesh = await start_mesh(server.url, model_repository)
    request = infer_request("mlp", {"features": np.ones((1, 64), np.float32)})
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            await stub.ModelInfer(request, timeout=RPC_TIMEOUT_S)
            server.stop()
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as down:
                await stub.ModelInfer(request, timeout=RPC_TIMEOUT_S)
            failed_after_s = time.monotonic() - started
            assert down.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "request queue unavailable" in (down.value.details() or "")
            assert failed_after_s < 5  # fails fast, well before the call's 10 s deadline

            retry_codes: set[grpc.StatusCode] = set()
            server = RedisServer(
                suite_binary_from_env(), port=port
            ).start()  # same address, empty: what a failover without data looks like
            async with asyncio.timeout(30):
                while True:  # no meshserve process is restarted; each retry is a real call
                    try:
                        response = await stub.ModelInfer(request, timeout=RPC_TIMEOUT_S)
                        break
                    except grpc.aio.AioRpcError as exc:
                        retry_codes.add(exc.code())
                        await asyncio.sleep(0.2)  # a client's retry backoff
            assert output_arrays(response)["logits"].shape == (1, 10)
            assert retry_codes <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
    finally:
        await stop_mesh(mesh)
        server.stop()


async def test_a_call_whose_job_redis_lost_is_answered_unavailable_not_left_to_its_deadline(
    model_repository: Path,
) -> None:
    """Redis comes back empty (no persistence, a lagging replica, or everysec's last
    writes) while a call waits: the gateway finds its job gone and answers at once."""
    server = RedisServer(suite_binary_from_env()).start()
    mesh = await start_mesh(server.url, model_repository)
    try:
        await hold_serving(mesh.workers[0])  # the job stays queued in Redis
        async with grpc.aio.insecure_channel(mesh.address) as channel, Redis.from_url(server.url) as redis:
            request = infer_request("mlp", {"features": np.ones((1, 64), np.float32)})
            call = asyncio.ensure_future(
                infer_stub(channel).ModelInfer(request, timeout=30)
            )  # long, yet within the test timeout
            await wait_queued(redis, "mlp", 1)
            port = server.port
            server.stop()
            server = RedisServer(suite_binary_from_env(), port=port).start()  # same address, no data
            with pytest.raises(grpc.aio.AioRpcError) as lost:
                await call
        assert lost.value.code() == grpc.StatusCode.UNAVAILABLE  # retryable, not DEADLINE_EXCEEDED at 30 s
        assert "Redis lost this request" in (lost.value.details() or "")
        assert mesh.gateway.metrics.registry.get_sample_value("meshserve_lost_requests_total") == 1
        assert mesh.gateway.gateway.queued == {}
    finally:
        await stop_mesh(mesh)
        server.stop()


async def test_a_broken_redis_connection_alone_fails_no_waiting_call(model_repository: Path) -> None:
    """The reply reader's connection drops but Redis keeps its data: the look for lost
    jobs finds the waiting one, leaves it, and the call is answered once work resumes."""
    server = RedisServer(suite_binary_from_env()).start()
    mesh = await start_mesh(server.url, model_repository)
    gateway = mesh.gateway.gateway
    try:
        worker = mesh.workers[0]
        await hold_serving(worker)
        async with grpc.aio.insecure_channel(mesh.address) as channel, Redis.from_url(server.url) as redis:
            request = infer_request("mlp", {"features": np.ones((1, 64), np.float32)})
            call = asyncio.ensure_future(infer_stub(channel).ModelInfer(request, timeout=RPC_TIMEOUT_S))
            await wait_queued(redis, "mlp", 1)
            # The job is in Redis before the enqueue's answer reaches the gateway:
            # let the gateway record it (a bounded look, a loop tick at a time).
            async with asyncio.timeout(5):
                while not gateway.queued:  # noqa: ASYNC110 - no event marks the record
                    await asyncio.sleep(0.001)
            assert len(gateway.queued) == 1
            await redis.client_kill_filter(_type="normal", skipme=True)  # every other connection
            async with asyncio.timeout(10):
                await gateway.looked_for_lost.wait()
            release_serving(worker)
            response = await call
        assert output_arrays(response)["logits"].shape == (1, 10)
        assert gateway.lost_jobs == 0
    finally:
        await stop_mesh(mesh)
        server.stop()


async def test_a_stopping_worker_is_not_serving_before_it_stops_taking_work(
    redis: Redis, redis_url: str, model_repository: Path
) -> None:
    mesh = await start_mesh(redis_url, model_repository)
    worker = mesh.workers[0]
    seen_at_stop: list[int] = []
    original_stop = worker.worker.stop

    async def observed_stop() -> None:
        async with grpc.aio.insecure_channel(worker.health_address) as channel:
            status = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            seen_at_stop.append(status.status)
        await original_stop()

    try:
        async with grpc.aio.insecure_channel(worker.health_address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            before = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            per_model = await health.Check(health_pb2.HealthCheckRequest(service="cnn/1"), timeout=5)
        worker.worker.stop = observed_stop  # type: ignore[method-assign]
        await worker.stop()
        mesh.workers.remove(worker)
    finally:
        await stop_mesh(mesh)
    assert before.status == health_pb2.HealthCheckResponse.SERVING
    assert per_model.status == health_pb2.HealthCheckResponse.SERVING
    assert seen_at_stop == [health_pb2.HealthCheckResponse.NOT_SERVING]


async def test_replies_and_acks_survive_a_flushed_script_cache(mesh: Mesh, redis: Redis) -> None:
    """Redis restarted without its scripts: the worker's pipelined ack (sent by SHA)
    fails with NOSCRIPT, and the worker acks again, loading the script."""
    await redis.script_flush()
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        request = infer_request("mlp", {"features": np.ones((1, 64), np.float32)})
        response = await infer_stub(channel).ModelInfer(request, timeout=10)
    assert output_arrays(response)["logits"].shape == (1, 10)
    worker = mesh.workers[0].worker
    await worker.leases.flushed()  # the ack's second round trip, if any
    assert await queue_leftovers(redis) == []  # acked: nothing leased or queued is left


async def test_a_worker_started_before_the_router_waits_for_it(redis_url: str, model_repository: Path) -> None:
    """Under `up` or in a cluster the router may come up after a worker: the worker's
    first report waits for the router instead of failing the worker's start."""
    from meshserve.settings import RouterSettings, WorkerSettings
    from model_workers.server import WorkerServer
    from router.server import RouterServer

    port = free_port()
    worker = WorkerServer(
        WorkerSettings(redis_url=redis_url, router_address=f"127.0.0.1:{port}", model_repository=model_repository)
    )
    stub, reported = worker.worker.reporter.router, asyncio.Event()

    class Reporting:  # the worker's own router stub, noting when the first report leaves
        def ReportWorker(self, *args: Any, **kwargs: Any) -> Any:  # noqa: N802
            reported.set()
            return stub.ReportWorker(*args, **kwargs)

    worker.worker.reporter.router = Reporting()  # type: ignore[assignment]
    starting = asyncio.create_task(worker.start())
    channel = worker.router_channel
    async with asyncio.timeout(10):
        await reported.wait()
        # A fail-fast call fails when its channel's connection is refused; this one waits.
        while (state := channel.get_state()) != grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            await channel.wait_for_state_change(state)
    router = RouterServer(RouterSettings(model_repository=model_repository, port=port, report_interval_ms=200))
    await router.start()
    try:
        async with asyncio.timeout(30):
            await starting
        assert all(served.model.ready for served in worker.worker.served.values())
        assert worker.worker.served
    finally:
        await worker.stop()
        await router.stop()
