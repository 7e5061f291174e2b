"""What a bench point cost Redis, from a real server's counters."""

from __future__ import annotations

import time

import pytest
from redis.asyncio import Redis

from meshserve.devkit.redis_server import RedisServer, suite_binary_from_env
from meshserve_bench.redis_cost import per_call, snapshot
from meshserve_bench.script_cost import measure, paths_for

# A loop of tens of milliseconds: Redis's CPU counters may move in 4 ms ticks.
BUSY_SCRIPT = """
for i = 1, 3000000 do end
redis.call('INCR', KEYS[1])
return redis.call('GET', KEYS[1])
"""


async def test_usage_counts_the_commands_scripts_run_and_not_its_own_snapshots() -> None:
    # A server of its own: the session's server may still carry another test's stray traffic.
    with RedisServer(suite_binary_from_env()) as server:
        redis = Redis.from_url(server.url)
        try:
            started_s = time.monotonic()
            before = await snapshot(redis)
            await redis.set("n", 1)
            for _ in range(2):  # two calls, each an EVAL running two commands, and a loop that costs CPU
                await redis.eval(BUSY_SCRIPT, 1, "n")
            usage = (await snapshot(redis)).usage_since(before)
            window_s = time.monotonic() - started_s
        finally:
            await redis.aclose()
    assert usage.commands == 7  # SET, and per EVAL the EVAL and the two commands the script ran
    # Seconds of the main thread: some (the loops), and no more than the window's wall time.
    assert 0 < usage.cpu_s <= window_s
    figures = per_call(usage, calls=2)
    assert figures["redis_commands_per_call"] == pytest.approx(3.5)
    assert figures["redis_cpu_us_per_call"] == pytest.approx(usage.cpu_s / 2 * 1e6)
    assert per_call(usage, calls=0) == {}


def test_the_script_cost_bench_takes_each_path_a_payload_can_take() -> None:
    assert paths_for(100) == ["lua"]
    assert paths_for(12_288) == ["lua", "key"]
    assert paths_for(110_592) == ["hash", "key"]


async def test_the_script_cost_bench_times_every_step_and_leaves_no_job(redis_url: str, redis: Redis) -> None:
    steps = await measure(redis_url, 12_288, "key", jobs=16, batch=8)
    assert set(steps) == {"enqueue", "claim and read", "reply and ack", "total"}
    assert all(value > 0 for value in steps.values())
    assert steps["total"] == sum(value for step, value in steps.items() if step != "total")
    assert [key for key in await redis.keys("*") if b":job:" in key] == []
