"""Scrape the real /metrics endpoints after a known workload and check the counts."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from meshserve.devkit.redis_server import free_port
from meshserve.observe.metrics import MIN_RATE_FOR_BACKLOG_PER_S, LabelMemo
from meshserve.queue import ModelKeys
from meshserve.tenancy.tenants import hash_key
from protos import meshserve_pb2 as mpb
from tests.support import (
    hold_serving,
    infer_request,
    infer_stub,
    release_serving,
    start_mesh,
    stop_mesh,
    wait_queued,
)

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
    assert gateway_samples[("meshserve_inflight_requests", frozenset({("model", "mlp")}))] == 0

    mlp_v1 = frozenset({("model", "mlp"), ("version", "1")})
    assert worker_samples[("meshserve_worker_requests_total", mlp_v1)] == 4
    assert worker_samples[("meshserve_worker_items_total", mlp_v1)] == 8
    assert worker_samples[("meshserve_worker_batches_total", mlp_v1)] == 4
    assert worker_samples[("meshserve_worker_batch_size_count", mlp_v1)] == 4
    assert worker_samples[("meshserve_worker_batch_size_sum", mlp_v1)] == 8
    assert worker_samples[("meshserve_worker_compute_seconds_count", mlp_v1)] == 4
    assert worker_samples[("meshserve_worker_compute_cpu_seconds_total", mlp_v1)] > 0  # warm-up ran it too
    assert worker_samples[("meshserve_worker_queue_wait_seconds_count", mlp_v1)] == 4


async def test_a_call_the_client_cancels_is_counted_cancelled_not_ok(
    redis: Redis, redis_url: str, model_repository: Path
) -> None:
    mesh = await start_mesh(redis_url, model_repository)
    keys = ModelKeys.for_model("mlp", 1)
    try:
        await hold_serving(mesh.workers[0])
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            call = infer_stub(channel).ModelInfer(infer_request("mlp", {"features": np.ones((1, 64), np.float32)}))
            await wait_queued(redis, "mlp", 1)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
        # The handler ends on the gateway's side, then its job is withdrawn: once the
        # queue is empty again the call has been counted. Nothing signals the
        # withdraw, so the test looks at the queue until then.
        async with asyncio.timeout(10):
            while await redis.zcard(keys.ready):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        registry = mesh.gateway.metrics.registry
        counted = {
            code: registry.get_sample_value("meshserve_requests_total", {"model": "mlp", "code": code})
            for code in ("OK", "CANCELLED")
        }
    finally:
        await stop_mesh(mesh)
    assert counted == {"OK": None, "CANCELLED": 1.0}


async def test_tenants_devices_cost_and_the_autoscaling_signal(
    redis: Redis, redis_url: str, model_repository: Path, tmp_path: Path
) -> None:
    """Per-tenant figures at the gateway and worker, device figures, cost per 1000
    requests, and the router's queue depths and backlog while a worker is held."""
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(
        f"""
tenants:
  - {{name: alpha, api_keys: ["{hash_key("alpha-key")}"], tier: realtime, models: ["*"]}}
  - {{name: beta, api_keys: ["{hash_key("beta-key")}"], tier: batch, models: ["mlp"]}}
"""
    )
    price = 3.6  # per device-hour: a device-second costs 0.001
    router_port = free_port()
    mesh = await start_mesh(
        redis_url,
        model_repository,
        tenants_path=tenants,
        worker_overrides={"price_per_device_hour": price},
        router_overrides={"metrics_port": router_port},
    )
    features = {"features": np.ones((1, 64), np.float32)}
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)

            def call(key: str) -> Any:
                metadata = (("authorization", f"Bearer {key}"),)
                return stub.ModelInfer(infer_request("mlp", features), metadata=metadata, timeout=10)

            for _ in range(3):
                await call("alpha-key")
            await call("beta-key")
            with pytest.raises(grpc.aio.AioRpcError):
                await call("wrong-key")
            # Held worker: two realtime and three batch requests wait in the queue.
            worker = mesh.workers[0]
            await hold_serving(worker)
            waiting = [asyncio.ensure_future(call("alpha-key")) for _ in range(2)]
            waiting += [asyncio.ensure_future(call("beta-key")) for _ in range(3)]
            await wait_queued(redis, "mlp", 5)
            router_samples = await scrape(router_port)
            held = parse(generate_latest(mesh.gateway.metrics.registry).decode())
            release_serving(worker)
            await asyncio.gather(*waiting)
        gateway_samples = parse(generate_latest(mesh.gateway.metrics.registry).decode())
        device_sample = worker.worker.reporter.device_sample  # no await before the scrape: no heartbeat between
        worker_samples = parse(generate_latest(worker.worker.metrics.registry).decode())
    finally:
        await stop_mesh(mesh)

    def labels(**pairs: str) -> frozenset[tuple[str, str]]:
        return frozenset(pairs.items())

    assert gateway_samples[("meshserve_tenant_requests_total", labels(tenant="alpha", code="OK"))] == 5
    assert gateway_samples[("meshserve_tenant_requests_total", labels(tenant="beta", code="OK"))] == 4
    unauthenticated = labels(tenant="<unauthenticated>", code="UNAUTHENTICATED")
    assert gateway_samples[("meshserve_tenant_requests_total", unauthenticated)] == 1
    assert gateway_samples[("meshserve_tenant_request_duration_seconds_count", labels(tenant="alpha"))] == 5

    assert held[("meshserve_inflight_requests", labels(model="mlp"))] == 5  # the five held calls
    mlp = labels(model="mlp", version="1")
    assert router_samples[("meshserve_model_ready", mlp)] == 1
    assert router_samples[("meshserve_queue_depth", labels(model="mlp", version="1", tier="realtime"))] == 2
    assert router_samples[("meshserve_queue_depth", labels(model="mlp", version="1", tier="standard"))] == 0
    assert router_samples[("meshserve_queue_depth", labels(model="mlp", version="1", tier="batch"))] == 3
    # nothing served in the last interval, so 5 queued read as 5 s at the floor rate
    assert router_samples[("meshserve_autoscale_backlog_seconds", mlp)] >= 5 / MIN_RATE_FOR_BACKLOG_PER_S - 1e-9

    device = "cpu"
    device_s = worker_samples[("meshserve_device_seconds_total", labels(model="mlp", version="1", device=device))]
    assert device_s == pytest.approx(worker_samples[("meshserve_worker_compute_seconds_sum", mlp)])
    by_tenant = {
        tenant: worker_samples[
            ("meshserve_tenant_device_seconds_total", labels(tenant=tenant, model="mlp", device=device))
        ]
        for tenant in ("alpha", "beta")
    }
    assert sum(by_tenant.values()) == pytest.approx(device_s)  # each batch's time shared out, none lost
    assert all(seconds > 0 for seconds in by_tenant.values())
    assert worker_samples[("meshserve_cost_per_1000_requests", mlp)] == pytest.approx(
        device_s / 9 * 1000 * price / 3600
    )
    # The device gauges show the worker's latest sample (how a sample is taken: test_devices.py).
    assert device_sample.memory_used_bytes > 0
    assert worker_samples[("meshserve_device_utilization_ratio", labels(device=device))] == pytest.approx(
        device_sample.utilization_ratio
    )
    assert worker_samples[("meshserve_device_memory_used_bytes", labels(device=device))] == pytest.approx(
        device_sample.memory_used_bytes
    )
    assert worker_samples[("meshserve_device_memory_total_bytes", labels(device=device))] == pytest.approx(
        device_sample.memory_total_bytes
    )
    weights = (model_repository / "mlp" / "1" / "model.onnx").stat().st_size
    assert worker_samples[("meshserve_model_memory_bytes", labels(model="mlp", version="1", device=device))] == weights


def test_a_label_memo_keeps_each_metric_and_label_values_apart() -> None:
    registry = CollectorRegistry()
    calls = Counter("calls", "Calls.", ["model", "code"], registry=registry)
    waits = Counter("waits", "Waits.", ["model", "code"], registry=registry)
    labelled = LabelMemo()
    for _ in range(3):
        labelled(calls, "cnn", "OK").inc()
    labelled(calls, "cnn", "UNAVAILABLE").inc(2)
    labelled(waits, "cnn", "OK").inc(5)  # same values, another metric
    assert registry.get_sample_value("calls_total", {"model": "cnn", "code": "OK"}) == 3
    assert registry.get_sample_value("calls_total", {"model": "cnn", "code": "UNAVAILABLE"}) == 2
    assert registry.get_sample_value("waits_total", {"model": "cnn", "code": "OK"}) == 5
