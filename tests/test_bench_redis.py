"""What a bench point cost Redis: the counters read from a real server, and the
report's lines from given figures."""

from __future__ import annotations

import os

from redis.asyncio import Redis

from meshserve.devkit.redis_server import RedisServer
from meshserve_bench import sweep as bench
from meshserve_bench.redis_cost import RedisUsage, per_call_lines, snapshot


async def test_usage_counts_the_commands_scripts_run_and_not_its_own_snapshots() -> None:
    # A server of its own: the session's server may still carry another test's stray traffic.
    with RedisServer(os.environ.get("MESHSERVE_TEST_REDIS_BINARY") or None) as server:
        redis = Redis.from_url(server.url)
        try:
            before = await snapshot(redis)
            await redis.set("n", 1)
            await redis.eval("redis.call('INCR', KEYS[1]); return redis.call('GET', KEYS[1])", 1, "n")
            usage = (await snapshot(redis)).usage_since(before)
        finally:
            await redis.aclose()
    assert usage.commands == 4  # SET, EVAL and the two commands the script ran
    assert usage.cpu_s >= 0


def test_per_call_lines_divide_by_calls_and_say_what_one_core_carries() -> None:
    rows = [(1, 1000, RedisUsage(commands=43_000, cpu_s=0.5)), (32, 0, RedisUsage(commands=0, cpu_s=0.0))]
    assert per_call_lines(rows) == [
        "redis per call (commands include those the queue scripts run; cpu is its main thread):",
        "concurrency  commands  cpu us  calls/s one Redis core carries",
        "1            43.0      500     2 000",
    ]


def test_the_sweep_report_ends_with_the_redis_lines_when_redis_was_read() -> None:
    raw = bench.RawFigures(p50_ms=1.0, p99_ms=1.5, items_per_s_by_batch={1: 1000.0})
    point = bench.PointFigures(1, 1, 10.0, 990, 3.0, 5.5, {"UNAVAILABLE": 10}, 1.0, RedisUsage(25_000, 0.25))
    lines = bench.format_report("cnn", 10.0, {"cores": 2, "platform": "Linux-test"}, raw, [point]).splitlines()
    assert lines[-1] == "1            25.0      250     4 000"  # per call: the 10 failed calls count too
