"""What a queued request costs Redis's memory, by payload size: the figure to size
``maxmemory`` with (docs/scale-out.md). Requests wait in Redis while the worker is
held; Redis's own ``used_memory`` is read before and after. Prints the figures; the
assertion is only that a request costs its payload plus a bounded overhead."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
from redis.asyncio import Redis

from tests.support import Mesh, hold_serving, infer_request, infer_stub, release_serving, wait_queued

QUEUED_BYTES = 8 * 1024 * 1024
"""Requests queued per size: this much payload (at least 32, at most 256 requests), so
that Redis's own churn between two reads (buffers resized, keys freed) is noise."""
SIDES = (16, 64, 256, 512)
"""scale_any's image is side x side FP32: 1 KiB, 16 KiB, 256 KiB, 1 MiB of payload."""
OVERHEAD_BOUND_BYTES = 64 * 1024
ALLOCATOR_ROUNDING = 0.25
"""jemalloc (Debian's redis-server) serves a large allocation from size classes four
to a doubling, so a payload just over 256 KiB takes 320 KiB: up to a quarter more.
A payload held twice would still be far past the bound."""


async def _used_memory(redis: Redis) -> int:
    return int((await redis.info("memory"))["used_memory"])


async def test_a_queued_request_costs_redis_its_payload_and_a_bounded_overhead(mesh: Mesh, redis: Redis) -> None:
    worker = mesh.workers[0]
    lines = []
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        stub = infer_stub(channel)
        for round_index, side in enumerate((SIDES[0], *SIDES)):
            await hold_serving(worker)
            image = np.ones((1, 1, side, side), np.float32)
            queued = min(256, max(32, QUEUED_BYTES // image.nbytes))
            before = await _used_memory(redis)
            calls = [
                asyncio.ensure_future(stub.ModelInfer(infer_request("scale_any", {"image": image}), timeout=30))
                for _ in range(queued)
            ]
            await wait_queued(redis, "scale_any", queued)
            per_request = (await _used_memory(redis) - before) / queued
            release_serving(worker)
            await asyncio.gather(*calls)
            if round_index == 0:
                continue  # unmeasured: creates the queue's own keys and the connections' buffers
            overhead = per_request - image.nbytes
            lines.append(
                f"payload {image.nbytes / 1024:7.0f} KiB: {per_request / 1024:8.1f} KiB per queued request"
                f" (overhead {overhead / 1024:+.1f} KiB, {queued} queued)"
            )
            bound = image.nbytes * (1 + ALLOCATOR_ROUNDING) + OVERHEAD_BOUND_BYTES
            assert image.nbytes <= per_request <= bound
    print("\nRedis memory per queued request (used_memory delta over 32-256 requests):")
    print("\n".join(lines))
