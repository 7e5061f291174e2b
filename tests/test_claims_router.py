"""What docs/reliability.md promises of the router when Redis goes away: it needs no
restart. Its one use of Redis is the queue depths it exports at scrape time; with
Redis down a scrape still answers (without depths), and once a Redis is back at the
same address the depths come back."""

from __future__ import annotations

import asyncio
import os
import re
import urllib.request
from pathlib import Path

import pytest
from redis.asyncio import Redis

from meshserve.devkit.examples import write_example_repository
from meshserve.devkit.redis_server import RedisServer, free_port
from meshserve.queue import TIERS, ModelKeys, tier_score_range
from meshserve.settings import RouterSettings
from router.server import RouterServer

MLP = ModelKeys.for_model("mlp", 1)


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def standard_depth(page: str) -> int | None:
    """mlp version 1's depth in the standard tier, None when the page has none."""
    pattern = r'^meshserve_queue_depth\{(?=[^}]*model="mlp")(?=[^}]*tier="standard")[^}]*\} (\S+)$'
    found = re.search(pattern, page, re.MULTILINE)
    return int(float(found.group(1))) if found else None


async def queue_jobs(url: str, count: int) -> None:
    """``count`` entries in mlp's standard tier (depth counts the ready set only)."""
    low, _ = tier_score_range(TIERS["standard"])
    client = Redis.from_url(url)
    try:
        await client.zadd(MLP.ready, {f"job-{i}": float(low) + i for i in range(count)})
    finally:
        await client.aclose()


@pytest.mark.timeout(40)
async def test_the_router_reads_queue_depths_again_after_redis_restarts(tmp_path: Path) -> None:
    binary = os.environ.get("MESHSERVE_TEST_REDIS_BINARY") or None
    server = RedisServer(binary).start()
    port = server.port
    metrics_port = free_port()
    router = RouterServer(
        RouterSettings(
            model_repository=write_example_repository(tmp_path, ["mlp"]),
            port=0,
            redis_url=server.url,
            metrics_host="127.0.0.1",
            metrics_port=metrics_port,
        )
    )
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    await router.start()
    try:
        await queue_jobs(server.url, 2)
        before = standard_depth(await asyncio.to_thread(scrape, url))
        server.stop()
        during = await asyncio.to_thread(scrape, url)  # answers, without depths
        server = RedisServer(binary, port=port).start()  # same address, empty
        await queue_jobs(server.url, 3)
        after = standard_depth(await asyncio.to_thread(scrape, url))
    finally:
        await router.stop()
        server.stop()

    assert before == 2
    assert standard_depth(during) is None
    assert "meshserve_model_ready" in during  # the rest of the metrics still go out
    assert after == 3  # the same router, its client reconnected
