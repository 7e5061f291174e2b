"""Triton's ModelStatistics through the mesh: the counts match what was sent, a
failed request is counted as failed, a tenant sees only its models, and the
router's sum over workers never goes back (router/statistics.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import generate_latest
from redis.asyncio import Redis

from meshserve.cli.main import main as cli_main
from meshserve.devkit.examples import write_example_repository
from meshserve.tenancy.tenants import hash_key
from protos import grpc_service_pb2 as pb
from router.statistics import StatisticsBook
from tests.support import Mesh, infer_request, infer_stub, start_mesh, stop_mesh
from tests.test_resilience import write_gather_model

RPC_TIMEOUT_S = 10
BATCH_SIZES = [1, 2, 3, 1, 4, 2, 1, 3, 2, 1, 1, 2]  # items per request


async def report_now(mesh: Mesh) -> None:
    """Every worker reports to the router now (what the 200 ms heartbeat does next):
    the figures of every answered request are in the router once this returns."""
    for worker in mesh.workers:
        await worker.worker.reporter.report()


def features(items: int) -> np.ndarray:
    return np.random.default_rng(items).standard_normal((items, 64)).astype(np.float32)


async def test_counts_match_what_was_sent(
    redis: Redis, redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repository = write_example_repository(tmp_path, ["mlp", "adder_fixed"])
    mesh = await start_mesh(redis_url, repository)
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            before = await stub.ModelStatistics(pb.ModelStatisticsRequest(name="mlp"), timeout=RPC_TIMEOUT_S)
            sent_ms = time.time() * 1000
            await asyncio.gather(
                *(
                    stub.ModelInfer(infer_request("mlp", {"features": features(n)}), timeout=RPC_TIMEOUT_S)
                    for n in BATCH_SIZES
                )
            )
            answered_ms = time.time() * 1000
            await report_now(mesh)
            answer = await stub.ModelStatistics(pb.ModelStatisticsRequest(name="mlp"), timeout=RPC_TIMEOUT_S)
            every = await stub.ModelStatistics(pb.ModelStatisticsRequest(), timeout=RPC_TIMEOUT_S)
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await stub.ModelStatistics(pb.ModelStatisticsRequest(name="nope"), timeout=RPC_TIMEOUT_S)
            with pytest.raises(grpc.aio.AioRpcError) as unknown_version:
                await stub.ModelStatistics(pb.ModelStatisticsRequest(name="mlp", version="7"), timeout=RPC_TIMEOUT_S)
            metadata = await stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=RPC_TIMEOUT_S)
            exported = generate_latest(mesh.router.metrics.registry).decode()
            capsys.readouterr()
            # the command's call is synchronous: on a thread, the mesh serves it meanwhile
            exit_code = await asyncio.to_thread(cli_main, ["models", "--address", mesh.address, "stats", "mlp"])
            table = capsys.readouterr().out
    finally:
        await stop_mesh(mesh)

    assert [(s.name, s.version, s.inference_count) for s in before.model_stats] == [("mlp", "1", 0)]
    (stats,) = answer.model_stats
    assert (stats.name, stats.version) == ("mlp", "1")
    requests = len(BATCH_SIZES)
    assert stats.inference_count == sum(BATCH_SIZES)
    infer = stats.inference_stats
    assert infer.success.count == requests
    assert infer.fail.count == 0
    assert 1 <= stats.execution_count <= requests
    assert sent_ms - 1 <= stats.last_inference <= answered_ms + 1
    for duration in (infer.success, infer.queue, infer.compute_input, infer.compute_infer, infer.compute_output):
        assert duration.count == requests
        assert duration.ns > 0
    assert infer.success.ns >= infer.queue.ns + infer.compute_infer.ns
    by_size = stats.batch_stats
    assert [b.batch_size for b in by_size] == sorted({b.batch_size for b in by_size})
    assert sum(b.compute_infer.count for b in by_size) == stats.execution_count
    assert sum(b.batch_size * b.compute_infer.count for b in by_size) == stats.inference_count
    assert all(b.compute_input.count == b.compute_output.count == b.compute_infer.count for b in by_size)
    assert all(b.compute_infer.ns > 0 for b in by_size)

    assert [(s.name, s.version) for s in every.model_stats] == [("adder_fixed", "1"), ("mlp", "1")]
    assert every.model_stats[0].inference_count == 0
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert "unknown model 'nope'" in (unknown.value.details() or "")
    assert unknown_version.value.code() == grpc.StatusCode.NOT_FOUND
    assert "unknown version '7' of model 'mlp'" in (unknown_version.value.details() or "")
    assert "statistics" in metadata.extensions

    mlp = 'model="mlp",version="1"'
    assert f"meshserve_model_inferences_total{{{mlp}}} {sum(BATCH_SIZES)}.0" in exported
    assert f"meshserve_model_executions_total{{{mlp}}} {stats.execution_count}.0" in exported
    assert f'meshserve_model_requests_total{{model="mlp",outcome="success",version="1"}} {requests}.0' in exported
    assert 'meshserve_model_requests_total{model="mlp",outcome="fail",version="1"} 0.0' in exported
    assert 'meshserve_model_phase_seconds_total{model="mlp",phase="compute_infer",version="1"}' in exported

    assert exit_code == 0
    lines = table.splitlines()
    assert lines[0].split()[:6] == ["MODEL", "VERSION", "REQUESTS", "FAILED", "ITEMS", "BATCHES"]
    assert lines[1].split()[:6] == ["mlp", "1", str(requests), "0", str(sum(BATCH_SIZES)), str(stats.execution_count)]
    assert [line.split()[1] for line in lines[2:]] == [str(b.batch_size) for b in by_size]


async def test_a_request_the_model_fails_is_counted_as_failed(redis: Redis, redis_url: str, tmp_path: Path) -> None:
    repository = tmp_path / "models"
    write_gather_model(repository)
    mesh = await start_mesh(redis_url, repository)
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            await stub.ModelInfer(infer_request("lookup", {"idx": np.array([3, 4], np.int64)}), timeout=RPC_TIMEOUT_S)
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await stub.ModelInfer(
                    infer_request("lookup", {"idx": np.array([100], np.int64)}), timeout=RPC_TIMEOUT_S
                )
            await report_now(mesh)
            answer = await stub.ModelStatistics(pb.ModelStatisticsRequest(name="lookup"), timeout=RPC_TIMEOUT_S)
    finally:
        await stop_mesh(mesh)

    assert failed.value.code() == grpc.StatusCode.INTERNAL
    (stats,) = answer.model_stats
    infer = stats.inference_stats
    assert (infer.success.count, infer.fail.count) == (1, 1)
    assert infer.fail.ns > 0
    assert (stats.inference_count, stats.execution_count) == (2, 1)  # a failed batch is no execution
    assert [(b.batch_size, b.compute_infer.count) for b in stats.batch_stats] == [(2, 1)]


async def test_the_sum_over_workers_outlives_a_worker(redis: Redis, redis_url: str, tmp_path: Path) -> None:
    repository = write_example_repository(tmp_path, ["mlp"])
    mesh = await start_mesh(redis_url, repository, workers=2)
    first, second = mesh.workers
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            calls = [
                stub.ModelInfer(infer_request("mlp", {"features": features(n)}), timeout=RPC_TIMEOUT_S)
                for n in BATCH_SIZES
            ]
            await asyncio.gather(*calls)
            await report_now(mesh)
            served_by = [w.worker.served[("mlp", 1)].statistics.inference_count for w in mesh.workers]
            both = await stub.ModelStatistics(pb.ModelStatisticsRequest(name="mlp"), timeout=RPC_TIMEOUT_S)
            await first.stop()  # reported while stopping: its figures stay in the sum
            mesh.workers = [second]
            await stub.ModelInfer(infer_request("mlp", {"features": features(5)}), timeout=RPC_TIMEOUT_S)
            await report_now(mesh)
            after = await stub.ModelStatistics(pb.ModelStatisticsRequest(name="mlp"), timeout=RPC_TIMEOUT_S)
    finally:
        await stop_mesh(mesh)

    assert sum(served_by) == sum(BATCH_SIZES)
    assert both.model_stats[0].inference_count == sum(BATCH_SIZES)
    assert after.model_stats[0].inference_count == sum(BATCH_SIZES) + 5
    assert after.model_stats[0].inference_stats.success.count == len(BATCH_SIZES) + 1


TENANTS = f"""
tenants:
  - name: narrow
    api_keys: ["{hash_key("narrow-key")}"]
    models: ["mlp"]
"""


async def test_a_tenant_sees_only_its_models(redis: Redis, redis_url: str, tmp_path: Path) -> None:
    repository = write_example_repository(tmp_path / "models", ["mlp", "adder_fixed"])
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(TENANTS)
    mesh = await start_mesh(redis_url, repository, tenants_path=tenants)
    auth = (("authorization", "Bearer narrow-key"),)
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            every = await stub.ModelStatistics(pb.ModelStatisticsRequest(), metadata=auth, timeout=RPC_TIMEOUT_S)
            with pytest.raises(grpc.aio.AioRpcError) as other:
                await stub.ModelStatistics(
                    pb.ModelStatisticsRequest(name="adder_fixed"), metadata=auth, timeout=RPC_TIMEOUT_S
                )
            with pytest.raises(grpc.aio.AioRpcError) as anonymous:
                await stub.ModelStatistics(pb.ModelStatisticsRequest(), timeout=RPC_TIMEOUT_S)
    finally:
        await stop_mesh(mesh)

    assert [s.name for s in every.model_stats] == ["mlp"]
    assert other.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED


# ------------------------------------------------------------ the router's book


def figures(executions: int, items: int, batch_size: int = 1, fails: int = 0) -> pb.ModelStatistics:
    stats = pb.ModelStatistics(name="m", version="1", inference_count=items, execution_count=executions)
    stats.inference_stats.success.count = items // batch_size
    stats.inference_stats.fail.count = fails
    stats.batch_stats.add(batch_size=batch_size).compute_infer.count = executions
    return stats


def total(book: StatisticsBook) -> tuple[int, int, list[tuple[int, int]]]:
    (stats,) = book.totals([("m", 1)])
    return (
        stats.inference_count,
        stats.execution_count,
        [(b.batch_size, b.compute_infer.count) for b in stats.batch_stats],
    )


def test_the_book_sums_workers_and_never_goes_back() -> None:
    book = StatisticsBook()
    assert total(book) == (0, 0, [])
    book.record("w1", {("m", 1): figures(3, 3)})
    book.record("w2", {("m", 1): figures(2, 4, batch_size=2)})
    assert total(book) == (7, 5, [(1, 3), (2, 2)])

    book.record("w1", {("m", 1): figures(4, 4)})  # cumulative: replaces, never adds
    assert total(book) == (8, 6, [(1, 4), (2, 2)])

    book.record("w2", {})  # w2 dropped the model: its last figures stay
    assert total(book) == (8, 6, [(1, 4), (2, 2)])
    book.record("w2", {("m", 1): figures(1, 2, batch_size=2)})  # ... and loaded it again: counts from 0
    assert total(book) == (10, 7, [(1, 4), (2, 3)])

    book.record("w1", {("m", 1): figures(1, 1)})  # dropped and loaded between two reports: went back
    assert total(book) == (11, 8, [(1, 5), (2, 3)])
    # w1 stops reporting (the router forgets it): nothing of it is lost
    assert total(book) == (11, 8, [(1, 5), (2, 3)])
