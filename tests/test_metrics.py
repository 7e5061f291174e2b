"""Scrape the real /metrics endpoints after a known workload and check the counts."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from meshserve.redis_server import free_port
from protos import meshserve_pb2 as mpb
from tests.support import infer_request, infer_stub, start_mesh, stop_mesh

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(port: int) -> Samples:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    return parse(await asyncio.to_thread(get))


async def test_gateway_and_worker_metrics_count_a_known_workload(
    redis: Redis, redis_url: str, model_repository: Path
) -> None:
    port = free_port()
    mesh = await start_mesh(redis_url, model_repository, metrics_port=port)
    features = {"features": np.ones((2, 64), np.float32)}
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            for _ in range(3):
                await stub.ModelInfer(infer_request("mlp", features), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.ModelInfer(infer_request("nope", features), timeout=10)
            # A reply delivered twice (a slow worker whose lease was reclaimed):
            # push a copy of a finished request's reply, then one more real call,
            # whose reply the reader takes after the copy (one list, FIFO).
            gateway = mesh.gateway.gateway
            duplicate = mpb.InferReply(id="finished-long-ago", code=0)
            await redis.rpush(gateway.reply_to, duplicate.SerializeToString())
            await stub.ModelInfer(infer_request("mlp", features), timeout=10)
        gateway_samples = await scrape(port)
        worker = mesh.workers[0].worker
        worker_samples = parse(generate_latest(worker.metrics.registry).decode())
    finally:
        await stop_mesh(mesh)

    mlp_ok = frozenset({("model", "mlp"), ("code", "OK")})
    assert gateway_samples[("meshserve_requests_total", mlp_ok)] == 4
    unknown_not_found = frozenset({("model", "<unknown>"), ("code", "NOT_FOUND")})  # never a label per client name
    assert gateway_samples[("meshserve_requests_total", unknown_not_found)] == 1
    assert gateway_samples[("meshserve_request_duration_seconds_count", frozenset({("model", "mlp")}))] == 4
    assert gateway_samples[("meshserve_late_replies_total", frozenset())] == 1
    assert gateway_samples[("meshserve_inflight_requests", frozenset())] == 0

    mlp_v1 = frozenset({("model", "mlp"), ("version", "1")})
    assert worker_samples[("meshserve_worker_requests_total", mlp_v1)] == 4
    assert worker_samples[("meshserve_worker_items_total", mlp_v1)] == 8
    assert worker_samples[("meshserve_worker_batches_total", mlp_v1)] == 4
    assert worker_samples[("meshserve_worker_batch_size_count", frozenset({("model", "mlp")}))] == 4
    assert worker_samples[("meshserve_worker_batch_size_sum", frozenset({("model", "mlp")}))] == 8
