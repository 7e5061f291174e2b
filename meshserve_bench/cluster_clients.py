"""Which client the request path should use on a Redis Cluster: meshserve's
:class:`~meshserve.store.cluster.ClusterLink` or redis-py's asyncio ``RedisCluster``.

``python -m meshserve_bench.cluster_clients`` starts a loopback cluster (three masters,
a replica each), then runs the same closed loop through each client: ``--callers``
concurrent callers, each call one EVALSHA of a small script on a model's keys (as
ENQUEUE, CLAIM and ACK are) followed by a two-command pipeline over two slots (as a
reply push beside a job check). Prints calls/s and the client's CPU µs per call
(process time: the loop and its parsing, the figure that caps a gateway's core).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from meshserve.devkit.redis_cluster import RedisCluster
from meshserve.queue import ModelKeys, reply_key
from meshserve.store.clients import command_link
from meshserve.store.cluster import async_cluster_client
from meshserve.store.link import Script

SCRIPT = Script("redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2]) return redis.call('ZREM', KEYS[1], ARGV[2])")


async def _loop(call: Callable[[int], Awaitable[None]], callers: int, duration_s: float) -> dict[str, float]:
    stop = time.monotonic() + duration_s
    done = 0

    async def caller(n: int) -> None:
        nonlocal done
        i = 0
        while time.monotonic() < stop:
            await call(n * 1_000_000 + i)
            i += 1
            done += 1

    cpu, wall = time.process_time(), time.monotonic()
    await asyncio.gather(*(caller(n) for n in range(callers)))
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    return {"calls_per_s": done / wall, "client_cpu_us_per_call": 1e6 * cpu / max(done, 1)}


async def measure(url: str, callers: int, duration_s: float) -> dict[str, dict[str, float]]:
    keys = ModelKeys.for_model("bench", 1)
    replies = reply_key("bench-gateway")
    link = command_link(url)
    await link.load(SCRIPT)

    async def via_link(i: int) -> None:
        await link.script(SCRIPT, [keys.ready], [i, f"j{i}"])
        await link.pipeline([("SET", replies, i), ("EXISTS", keys.job(str(i)))])

    client = async_cluster_client(url)
    assert isinstance(client, AsyncRedisCluster)
    script = client.register_script(SCRIPT.body)

    async def via_redis_py(i: int) -> None:
        await script(keys=[keys.ready], args=[i, f"j{i}"])
        pipe = client.pipeline(transaction=False)
        pipe.set(replies, i)
        pipe.exists(keys.job(str(i)))
        await pipe.execute()

    results: dict[str, dict[str, Any]] = {}
    try:
        await _loop(via_link, callers, 1.0)  # warm both (connections, slot maps, scripts)
        await _loop(via_redis_py, callers, 1.0)
        results["ClusterLink"] = await _loop(via_link, callers, duration_s)
        results["redis-py RedisCluster"] = await _loop(via_redis_py, callers, duration_s)
    finally:
        await link.aclose()
        await client.aclose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--json", default=None, help="write the figures to this file")
    options = parser.parse_args()
    with RedisCluster() as cluster:
        results = asyncio.run(measure(cluster.url, options.callers, options.duration_s))
    for name, figures in results.items():
        print(
            f"{name}: {figures['calls_per_s']:.0f} calls/s, {figures['client_cpu_us_per_call']:.0f} µs client CPU/call"
        )
    if options.json:
        with open(options.json, "w") as out:
            json.dump({"callers": options.callers, "duration_s": options.duration_s, "results": results}, out, indent=2)


if __name__ == "__main__":
    main()
